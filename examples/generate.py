"""Sample images from a train_cifar.py checkpoint into an .npz (``arr_0``: uint8, (N, H, W, C)).

    python examples/generate.py --checkpoint runs/cifar/checkpoint.pt --num 50000 --out samples.npz

That is the sample format of the common GAN and diffusion evaluation tools (TF-GAN / OpenAI's
evaluator suite, torch-fidelity via an image folder, clean-fid). The EMA generator is used when the
checkpoint has one. The checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain
data only, so a checkpoint from someone else cannot run code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models


def main(argv=None):
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train_cifar.py")
    p.add_argument("--num", type=int, default=50_000, help="number of samples")
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw generator even if an EMA copy exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.num < 1 or args.batch < 1:
        p.error("--num and --batch must be >= 1")
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint!r} is not a file")

    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    cfg = ck["config"]
    gen, _ = models.build(cfg["arch"], cfg["dim"], cfg["image_size"], ck["channels"])
    use_ema = ck.get("ema") is not None and not args.no_ema
    gen.load_state_dict(ck["ema"] if use_ema else ck["generator"])
    gen.to(args.device).eval()

    torch.manual_seed(args.seed)
    chunks = []
    with torch.no_grad():
        for i in range(0, args.num, args.batch):
            z = torch.randn(min(args.batch, args.num - i), models.Z_DIM, device=args.device)
            x = gen(z).float().clamp(-1, 1)
            chunks.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    arr = np.concatenate(chunks)
    np.savez(args.out, arr_0=arr)
    print(f"wrote {arr.shape[0]} samples {arr.shape[1:]} ({'EMA' if use_ema else 'raw'} generator) to {args.out}")


if __name__ == "__main__":
    main()
