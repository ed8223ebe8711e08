"""Sample images from a train_cifar.py checkpoint into an .npz (``arr_0``: uint8, (N, H, W, C)).

    python examples/generate.py --checkpoint runs/cifar10/checkpoint.pt --num 50000 --out samples.npz

That is the sample format of the common GAN and diffusion evaluation tools (TF-GAN / OpenAI's
evaluator suite, torch-fidelity via an image folder, clean-fid). The EMA generator is used when the
checkpoint has one. The checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain
data only, so a checkpoint from someone else cannot run code. ``.npz`` is added to ``--out`` when it
lacks it (as ``numpy.savez`` does); the path written is printed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models
from train_cifar import OneLineParser, load_weights, read_checkpoint


def load_generator(path, device="cpu", use_ema: bool = True) -> tuple[torch.nn.Module, bool]:
    """The checkpoint's generator in eval mode (its EMA copy if it has one and ``use_ema``), and whether it is the EMA.

    Raises SystemExit with one line naming the file when it cannot be read or does not fit its config.
    """
    path = Path(path)
    ck = read_checkpoint(path, prog="generate.py")
    cfg = ck["config"]
    try:
        gen, _ = models.build(cfg["arch"], cfg["dim"], cfg["image_size"], ck["channels"])
    except (KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"generate.py: error: checkpoint {str(path)!r} has no usable config ({e})") from None
    ema = use_ema and ck.get("ema") is not None
    load_weights(gen, ck["ema"] if ema else ck["generator"], "generator", path, cfg, prog="generate.py")
    return gen.to(device).eval(), ema


def main(argv=None):
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train_cifar.py")
    p.add_argument("--num", type=int, default=50_000, help="number of samples")
    p.add_argument("--out", default="samples.npz", help="output .npz file")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw generator even if an EMA copy exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be >= 1, got {args.num}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint!r} is not a file")
    out = Path(args.out if args.out.endswith(".npz") else args.out + ".npz")
    folder = out.parent
    if not folder.is_dir():
        p.error(f"--out {args.out!r}: the directory {str(folder)!r} does not exist")
    if out.is_dir():
        p.error(f"--out {args.out!r} is a directory")
    if not os.access(folder, os.W_OK):
        p.error(f"--out {args.out!r}: the directory {str(folder)!r} is not writable")

    gen, use_ema = load_generator(args.checkpoint, args.device, use_ema=not args.no_ema)
    torch.manual_seed(args.seed)
    chunks = []
    with torch.no_grad():
        for i in range(0, args.num, args.batch):
            z = torch.randn(min(args.batch, args.num - i), models.Z_DIM, device=args.device)
            x = gen(z).float().clamp(-1, 1)
            chunks.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    arr = np.concatenate(chunks)
    with open(out, "wb") as f:
        np.savez(f, arr_0=arr)
    print(f"wrote {arr.shape[0]} samples {arr.shape[1:]} ({'EMA' if use_ema else 'raw'} generator) to {out}")


if __name__ == "__main__":
    main()
