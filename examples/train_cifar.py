r"""WGAN-GP image trainer built on gradpen (Gulrajani et al., "Improved Training of Wasserstein GANs", 2017).

Quick offline run on 2 CPU cores (scikit-learn's bundled digits, about 10 minutes):

    python examples/train_cifar.py --dataset digits --arch dcgan --dim 32 --iters 2000 \
        --sample-every 500 --out runs/digits

The paper's CIFAR-10 ResNet run (unsupervised, IS 7.86 in the paper) on one GPU:

    python examples/train_cifar.py --dataset cifar10 --data-dir data --out runs/cifar --eval-every 5000

Several GPUs (the batch is global, split across ranks; only rank 0 logs and checkpoints):

    torchrun --standalone --nproc_per_node=4 examples/train_cifar.py --dataset cifar10 --data-dir data --out runs/cifar

Continue an interrupted run with the same command plus ``--resume``. Samples, ``metrics.jsonl`` and
``checkpoint.pt`` go to ``--out``; ``examples/generate.py`` turns a checkpoint into an ``.npz`` of images.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models

import gradpen

# ----------------------------------------------------------------------------- defaults, with their sources
# Paper = Gulrajani et al. 2017; resnet = gan_cifar_resnet.py, dcgan = gan_cifar.py of the official code.
DEFAULTS = {
    "arch": "resnet",  # the paper's best unsupervised CIFAR-10 model (Table 3)
    "dim": 128,  # DIM_G = DIM_D = 128 (resnet)
    "batch_size": 64,  # critic batch (paper, Alg. 1 / Appendix F); the generator step uses 2x (GEN_BS_MULTIPLE)
    "n_critic": 5,  # critic steps per generator step (paper, Alg. 1)
    "gp_weight": 10.0,  # lambda (paper, Sec. 4 and Alg. 1)
    "iters": 100_000,  # generator steps (resnet: ITERS)
    "lr": {"resnet": 2e-4, "dcgan": 1e-4},  # resnet LR = 2e-4; dcgan 1e-4
    "betas": {"resnet": (0.0, 0.9), "dcgan": (0.5, 0.9)},  # Adam betas of each script
    "decay": {"resnet": True, "dcgan": False},  # resnet decays the LR linearly to 0 over ITERS; dcgan does not
}
PENALTIES = ["wgan-gp", "r1", "r2", "dragan", "wgan-div"]  # the kinds of gradpen.GradientPenalty
EVAL_SAMPLES = {"digits": 2000, "cifar10": 50_000, "folder": 10_000}  # 50k for IS/FID on CIFAR-10 (paper)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line that names the flag (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="train_cifar.py", description="WGAN-GP image trainer built on gradpen.")
    a = p.add_argument
    a("--dataset", choices=["cifar10", "folder", "digits"], default="cifar10", help="training images")
    a("--data-dir", default=None, help="CIFAR-10 root (downloaded there if online) or the image folder")
    a("--image-size", type=int, default=32, help="32 (default) or 64 (folder datasets)")
    a("--arch", choices=sorted(models.ARCHS), default=DEFAULTS["arch"])
    a("--dim", type=int, default=DEFAULTS["dim"], help="network width")
    a("--batch-size", type=int, default=DEFAULTS["batch_size"], help="global critic batch")
    a("--n-critic", type=int, default=DEFAULTS["n_critic"])
    a("--iters", type=int, default=DEFAULTS["iters"], help="generator steps; the LR decay runs over these")
    a("--lr", type=float, default=None, help="Adam LR (default: 2e-4 resnet, 1e-4 dcgan)")
    a("--beta1", type=float, default=None, help="Adam beta1 (default: 0 resnet, 0.5 dcgan); beta2 is 0.9")
    a("--lr-decay", choices=["auto", "linear", "none"], default="auto", help="auto: linear for resnet")
    a("--penalty", choices=PENALTIES, default="wgan-gp", help="gradpen penalty kind (GradientPenalty(kind=...))")
    a("--gp-weight", type=float, default=DEFAULTS["gp_weight"], help="penalty weight lambda")
    a("--gp-every", type=int, default=1, help="lazy regularisation: penalty every k critic steps, times k")
    a("--center", type=float, default=1.0, help="target gradient norm (wgan-gp, dragan)")
    a("--one-sided", action="store_true", help="one-sided penalty max(0, |g| - center)^2 (Petzka et al.)")
    a("--backend", choices=["autograd", "func"], default="autograd", help="gradpen backend")
    a("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast; fp16 adds a GradScaler")
    a("--ema", type=float, default=0.0, help="EMA decay of the generator for samples/eval (0: off), e.g. 0.999")
    a("--compile", action="store_true", help="torch.compile both networks (the penalty then uses torch.func)")
    a("--seed", type=int, default=0)
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--out", default="runs/wgan-gp", help="output directory")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--stop-at", type=int, default=None, help="checkpoint and exit at this generator step (job time limits)")
    a("--log-every", type=int, default=100, help="generator steps between log lines")
    a("--sample-every", type=int, default=1000, help="generator steps between sample grids")
    a("--ckpt-every", type=int, default=1000, help="generator steps between checkpoints")
    a("--eval-every", type=int, default=0, help="generator steps between evaluations (0: only at the end)")
    a("--eval-samples", type=int, default=None, help="samples per evaluation (default: 2000 digits, 50000 cifar10)")
    a("--inception-weights", default=None, help="local Inception weights file for torch-fidelity (offline)")
    a("--workers", type=int, default=0, help="CPU threads for decoding a folder dataset (0: main thread)")
    args = p.parse_args(argv)

    positive = ["dim", "batch_size", "n_critic", "iters", "gp_every", "log_every", "sample_every", "ckpt_every"]
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("gp_weight", "center", "eval_every", "workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.image_size not in (32, 64):
        p.error(f"--image-size must be 32 or 64, got {args.image_size}")
    if not 0.0 <= args.ema < 1.0:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.lr is not None and args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.beta1 is not None and not 0.0 <= args.beta1 < 1.0:
        p.error(f"--beta1 must be in [0, 1), got {args.beta1}")
    if args.dataset == "folder" and not args.data_dir:
        p.error("--data-dir is required with --dataset folder")
    if args.dataset == "folder" and args.data_dir and not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir!r} is not a directory")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.iters:
        p.error(f"--stop-at must be in [1, --iters={args.iters}], got {args.stop_at}")
    if args.eval_samples is not None and args.eval_samples < 10:
        p.error(f"--eval-samples must be >= 10, got {args.eval_samples}")
    if args.penalty in ("r1", "r2", "wgan-div") and (args.one_sided or args.center != 1.0):
        p.error(f"--center/--one-sided do not apply to --penalty {args.penalty}")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        p.error(f"--inception-weights {args.inception_weights!r} is not a file")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if args.amp == "fp16" and not (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())):
        p.error("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
    args.lr = args.lr if args.lr is not None else DEFAULTS["lr"][args.arch]
    args.beta1 = args.beta1 if args.beta1 is not None else DEFAULTS["betas"][args.arch][0]
    args.lr_decay = ("linear" if DEFAULTS["decay"][args.arch] else "none") if args.lr_decay == "auto" else args.lr_decay
    args.eval_samples = args.eval_samples or EVAL_SAMPLES[args.dataset]
    return args


# ----------------------------------------------------------------------------- data: uint8 images in memory


def load_images(args) -> torch.Tensor:
    """All training images as one uint8 tensor (N, C, S, S); augmentation happens per batch in the loop."""
    if args.dataset == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        x = torch.from_numpy(load_digits().images).float()[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
        x = F.interpolate(x, size=args.image_size, mode="bilinear", align_corners=False)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if args.dataset == "cifar10":
        from torchvision.datasets import CIFAR10

        root = args.data_dir or "data"
        try:
            data = CIFAR10(root, train=True, download=True).data  # (50000, 32, 32, 3) uint8
        except Exception as e:  # URLError, RuntimeError, ...: the download failed
            raise SystemExit(
                f"train_cifar.py: error: could not download CIFAR-10 into {root!r} ({type(e).__name__}: {e}). "
                "Offline? Put cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in --data-dir, "
                "or train on --dataset digits (bundled, offline) or --dataset folder --data-dir DIR."
            ) from None
        x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
        return x if args.image_size == 32 else F.interpolate(x.float(), size=args.image_size).round().byte()
    return load_folder(Path(args.data_dir), args.image_size, args.workers)


def load_folder(root: Path, size: int, workers: int) -> torch.Tensor:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from torchvision.transforms import functional as TF

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
    if not files:
        raise SystemExit(f"train_cifar.py: error: --data-dir {str(root)!r} holds no .png/.jpg/.jpeg/.bmp/.webp images")

    def decode(path):
        with Image.open(path) as im:
            im = TF.center_crop(TF.resize(im.convert("RGB"), size), size)
            return TF.pil_to_tensor(im)

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        return torch.stack(list(pool.map(decode, files)))


class ShardedBatches:
    """A distributed sampler with exact resume: epoch e is a permutation seeded by (seed, e), dealt across ranks.

    The position is the number of batches this rank has consumed, so a checkpoint restores it exactly.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int, consumed: int = 0):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.per_epoch = (n // world) // batch
        if self.per_epoch < 1:
            raise SystemExit(f"train_cifar.py: error: {n} images are too few for a batch of {batch} on {world} rank(s)")
        self.consumed = consumed
        self._epoch, self._perm = -1, None

    def next(self) -> torch.Tensor:
        epoch, i = divmod(self.consumed, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g)[self.rank :: self.world], epoch
        self.consumed += 1
        return self._perm[i * self.batch : (i + 1) * self.batch]


# ----------------------------------------------------------------------------- training


def setup_distributed(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return 0, 1, torch.device(args.device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return rank, world, torch.device(args.device, local) if args.device == "cuda" else torch.device("cpu")


def save_atomic(obj, path: Path):
    """Write to a temporary file in the same directory, fsync, then os.replace: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def drop_metrics_after(path: Path, it: int):
    """On resume, forget log lines written after the checkpoint, so the file reads as one clean run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines(keepends=True) if ln.strip() and json.loads(ln)["iter"] <= it]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def unwrap(m: nn.Module) -> nn.Module:
    m = m.module if isinstance(m, DDP) else m
    return getattr(m, "_orig_mod", m)  # torch.compile wrapper


def to_unit(x_uint8: torch.Tensor, device) -> torch.Tensor:
    return x_uint8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    if args.batch_size % world:
        raise SystemExit(f"train_cifar.py: error: --batch-size {args.batch_size} is not divisible by {world} ranks")
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    if rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    if not args.resume and ckpt_path.exists():
        raise SystemExit(
            f"train_cifar.py: error: {ckpt_path} exists; pass --resume to continue it or pick another --out"
        )
    if args.resume and not ckpt_path.exists():
        raise SystemExit(f"train_cifar.py: error: --resume given but {ckpt_path} does not exist")

    torch.manual_seed(args.seed)  # same initial weights on every rank
    images = load_images(args)
    channels = images.shape[1]
    gen, critic = models.build(args.arch, args.dim, args.image_size, channels)
    gen, critic = gen.to(device), critic.to(device)
    ema = copy.deepcopy(gen).eval().requires_grad_(False) if args.ema > 0 else None
    betas = (args.beta1, DEFAULTS["betas"][args.arch][1])  # beta2 = 0.9 in both scripts
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=args.lr, betas=betas)
    decay = (lambda it: max(0.0, 1.0 - it / args.iters)) if args.lr_decay == "linear" else (lambda it: 1.0)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, decay)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, decay)
    penalty = gradpen.GradientPenalty(
        args.gp_weight, args.center, args.one_sided, kind=args.penalty, backend=args.backend, every=args.gp_every
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    fixed_z = torch.randn(100, models.Z_DIM, generator=torch.Generator().manual_seed(args.seed)).to(device)

    start, consumed = 0, 0
    if args.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)  # tensors and plain data only
        gen.load_state_dict(ck["generator"])
        critic.load_state_dict(ck["critic"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        for obj, key in [(opt_g, "opt_g"), (opt_d, "opt_d"), (sched_g, "sched_g"), (sched_d, "sched_d"),
                         (penalty, "penalty"), (scaler, "scaler")]:  # fmt: skip
            obj.load_state_dict(ck[key])
        if ck["world"] != world:
            raise SystemExit(f"train_cifar.py: error: the checkpoint was written by {ck['world']} rank(s), not {world}")
        start, consumed = ck["iter"], ck["batches"][rank]
        set_rng_state(ck["rng"][rank], device)
        if rank == 0:
            print(f"resumed from {ckpt_path} at generator step {start}")
    else:
        torch.manual_seed(args.seed + rank)  # different noise and alpha on every rank

    per_rank = args.batch_size // world
    if device.type == "cuda":
        images = images.to(device)  # CIFAR-10 is 150 MB as uint8: keep it on the GPU
    if rank == 0 and args.resume:
        drop_metrics_after(out / "metrics.jsonl", start)
    batches = ShardedBatches(len(images), per_rank, args.seed, rank, world, consumed)
    flip = args.dataset != "digits"  # horizontal flips for natural images, never for digits
    if world > 1:
        gen, critic = DDP(gen), DDP(critic)  # broadcast rank 0's weights; gradients are averaged
    if args.compile:
        gen, critic = torch.compile(gen), torch.compile(critic)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
        if args.amp != "none"
        else contextlib.nullcontext()
    )

    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        except ImportError:
            pass
    progress = None
    if rank == 0:
        try:
            from tqdm import tqdm

            progress = tqdm(total=args.iters, initial=start, desc="train", dynamic_ncols=True, mininterval=2)
        except ImportError:
            pass

    def checkpoint(it):
        rngs = [None] * world
        counts = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state(device))
            dist.all_gather_object(counts, batches.consumed)
        else:
            rngs, counts = [rng_state(device)], [batches.consumed]
        if rank == 0:
            state = {
                "generator": unwrap(gen).state_dict(), "critic": unwrap(critic).state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
                "penalty": penalty.state_dict(), "scaler": scaler.state_dict(),
                "rng": rngs, "batches": counts, "iter": it, "config": vars(args), "world": world, "channels": channels,
            }  # fmt: skip
            save_atomic(state, ckpt_path)

    def sample_grid(it):
        g = ema if ema is not None else unwrap(gen)
        was_training = g.training
        g.eval()
        with torch.no_grad():
            x = g(fixed_z).float()
        g.train(was_training)
        from torchvision.utils import save_image

        save_image(x * 0.5 + 0.5, out / "samples" / f"iter_{it:06d}.png", nrow=10)

    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    acc = torch.zeros(5, device=device, dtype=torch.float64)  # sums for the log line, synced only when logging
    acc_n, t_last, it = 0, time.perf_counter(), start
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    try:
        for it in range(start + 1, args.iters + 1):
            # ---- critic: n_critic steps of  D(fake) - D(real) + lambda * penalty  (paper, Alg. 1)
            critic.requires_grad_(True)
            for _ in range(args.n_critic):
                real = images[batches.next()]
                real = to_unit(real, device)
                if flip:
                    real = torch.where(torch.rand(per_rank, 1, 1, 1, device=device) < 0.5, real.flip(3), real)
                z = torch.randn(per_rank, models.Z_DIM, device=device)
                with torch.no_grad(), amp:
                    fake = gen(z).float()
                with amp:
                    scores = critic(torch.cat([real, fake])).float()
                    d_real, d_fake = scores[:per_rank].mean(), scores[per_rank:].mean()
                    gp = penalty(critic, real, fake, scaler=scaler)  # lambda * penalty (0 on lazy-skipped steps)
                loss_d = d_fake - d_real + gp
                opt_d.zero_grad(set_to_none=True)
                scaler.scale(loss_d).backward()
                scaler.step(opt_d)
                scaler.update()
            # ---- generator: one step of -D(G(z)) on a 2x batch (GEN_BS_MULTIPLE = 2)
            critic.requires_grad_(False)
            z = torch.randn(2 * per_rank, models.Z_DIM, device=device)
            with amp:
                loss_g = -unwrap(critic)(gen(z)).float().mean()  # the bare critic: no DDP sync of its unused grads
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()
            scaler.step(opt_g)
            scaler.update()
            sched_g.step()
            sched_d.step()
            if ema is not None:
                with torch.no_grad():
                    src = unwrap(gen)
                    torch._foreach_lerp_(list(ema.parameters()), list(src.parameters()), 1.0 - args.ema)
                    for b_ema, b in zip(ema.buffers(), src.buffers(), strict=True):
                        b_ema.copy_(b)

            norms = penalty.last_norms.mean() if penalty.last_norms is not None else torch.zeros((), device=device)
            bad |= ~(torch.isfinite(loss_d) & torch.isfinite(loss_g))
            acc += torch.stack([loss_d, d_real - d_fake, gp, norms, loss_g]).double().detach()
            acc_n += 1

            boundary = it % args.log_every == 0 or it % args.ckpt_every == 0 or it == args.iters or it == args.stop_at
            if not boundary:
                if progress is not None:
                    progress.update(1)
                continue
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                raise FloatingPointError(
                    f"non-finite loss between generator steps {it - acc_n + 1} and {it} "
                    f"(try a smaller --lr, --amp none, or check the data); "
                    f"the last good checkpoint {ckpt_path} is kept"
                )
            if it % args.log_every == 0 or it == args.iters:
                mean = (acc / acc_n).tolist()
                now = time.perf_counter()
                img_s = acc_n * args.n_critic * args.batch_size / (now - t_last)
                rec = {
                    "iter": it, "loss_d": mean[0], "wasserstein": mean[1], "gp": mean[2], "grad_norm": mean[3],
                    "loss_g": mean[4], "lr": sched_g.get_last_lr()[0], "img_per_s": img_s,
                }  # fmt: skip
                if rank == 0:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    line = (
                        f"iter {it} | D {mean[0]:.3f} | W {mean[1]:.3f} | gp {mean[2]:.3f} | |g| {mean[3]:.3f} "
                        f"| G {mean[4]:.3f} | lr {rec['lr']:.2e} | {img_s:.0f} img/s"
                    )
                    write(line)
                    if writer is not None:
                        for k, v in rec.items():
                            if k != "iter":
                                writer.add_scalar(k, v, it)
                acc.zero_()
                acc_n, t_last = 0, now
            if progress is not None:
                progress.set_postfix(D=f"{loss_d.item():.3f}", G=f"{loss_g.item():.3f}", refresh=False)
                progress.update(1)
            if rank == 0 and (it % args.sample_every == 0 or it == args.iters):
                sample_grid(it)
            if args.eval_every and it % args.eval_every == 0 and it != args.iters:
                evaluate(args, ema if ema is not None else unwrap(gen), images, device, it, rank, metrics, writer)
            if it % args.ckpt_every == 0 or it == args.iters or it == args.stop_at:
                checkpoint(it)
            if it == args.stop_at:
                if rank == 0:
                    print(f"stopped at generator step {it} (--stop-at); continue with --resume")
                break
        else:
            evaluate(args, ema if ema is not None else unwrap(gen), images, device, it, rank, metrics, writer)
        if world > 1:
            check_replicas(unwrap(gen), unwrap(critic), rank)
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()
        if world > 1:
            dist.destroy_process_group()


def check_replicas(gen, critic, rank):
    """Every rank must hold bit-identical weights after a DDP run; raise otherwise."""
    mine = torch.cat([p.detach().reshape(-1).double().cpu() for m in (gen, critic) for p in m.parameters()])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine.to(next(critic.parameters()).device))
    same = all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)
    if rank == 0:
        print(f"DDP replicas identical: {same} ({dist.get_world_size()} ranks, {mine.numel()} parameters)")
    if not same:
        raise RuntimeError("DDP replicas diverged: the ranks hold different weights")


# ----------------------------------------------------------------------------- evaluation


def generate(g: nn.Module, n: int, device, batch: int = 500) -> torch.Tensor:
    """n samples in [-1, 1], float32, on the CPU."""
    was_training = g.training
    g.eval()
    with torch.no_grad():
        out = [g(torch.randn(min(batch, n - i), models.Z_DIM, device=device)).float().cpu() for i in range(0, n, batch)]
    g.train(was_training)
    return torch.cat(out)


def write(line: str):
    """Print without breaking the progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(line)
    except ImportError:
        print(line)


def evaluate(args, g, images, device, it, rank, metrics, writer):
    if rank != 0:
        return
    t0 = time.perf_counter()
    fake = generate(g, args.eval_samples, device)
    if args.dataset == "digits":
        import digits_score

        result = digits_score.score(fake, images)
    else:
        result = inception_metrics(args, fake)
        if result is None:
            return
    result = {"iter": it, "eval": True, **result, "eval_seconds": time.perf_counter() - t0}
    write("eval " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    metrics.write(json.dumps(result) + "\n")
    metrics.flush()
    if writer is not None:
        for k, v in result.items():
            if isinstance(v, float):
                writer.add_scalar(f"eval/{k}", v, it)


def inception_metrics(args, fake: torch.Tensor):
    """IS and FID through torch-fidelity, against CIFAR-10 train (or the folder's images)."""
    try:
        import torch_fidelity
    except ImportError:
        write("eval skipped: IS/FID need torch-fidelity (pip install torch-fidelity)")
        return None

    class Samples(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    kwargs = {"isc": True, "fid": True, "verbose": False, "cuda": torch.cuda.is_available()}
    if args.inception_weights:
        kwargs["feature_extractor_weights_path"] = args.inception_weights
    reference = "cifar10-train" if args.dataset == "cifar10" else str(Path(args.data_dir))
    try:
        m = torch_fidelity.calculate_metrics(
            input1=Samples(fake), input2=reference, datasets_root=args.data_dir, **kwargs
        )
    except Exception as e:  # most often: the Inception weights cannot be downloaded offline
        write(f"eval skipped: torch-fidelity failed ({type(e).__name__}: {e}); offline? pass --inception-weights FILE")
        return None
    return {"IS": m["inception_score_mean"], "IS_std": m["inception_score_std"],
            "FID": m["frechet_inception_distance"]}  # fmt: skip


if __name__ == "__main__":
    main()
