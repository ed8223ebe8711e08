r"""WGAN-GP image trainer built on gradpen (Gulrajani et al., "Improved Training of Wasserstein GANs", 2017).

Offline on a CPU (scikit-learn's bundled 8x8 digits, scored at the end; time and scores: docs/examples.md):

    python examples/train_cifar.py --dataset digits

The paper's CIFAR-10 ResNet run (unsupervised, IS 7.86 in the paper) on one GPU:

    python examples/train_cifar.py --dataset cifar10 --data-dir data --eval-every 5000

Several GPUs (the batch is global, split across ranks; only rank 0 logs and checkpoints):

    torchrun --standalone --nproc_per_node=4 examples/train_cifar.py --dataset cifar10 --data-dir data

A transformer critic (``--critic vit``) with WGAN-GP on the fd backend (no double backward; the
attention on its default kernel), and the same critic sharded with FSDP2 across 2 CPU processes
(see docs/examples.md):

    python examples/train_cifar.py --dataset digits --critic vit --vit-depth 1 --vit-patch 4 \
        --penalty wgan-gp --backend fd --iters 3000 --ema 0.99
    torchrun --standalone --nproc_per_node=2 examples/train_cifar.py --dataset digits --critic vit \
        --fsdp --penalty wgan-gp --backend fd

Continue an interrupted run with ``--resume`` (the checkpoint's config is used; flags that would change
the run are refused, except ``--iters`` and ``--lr``, which are applied and recorded). Samples,
``metrics.jsonl`` and ``checkpoint.pt`` go to ``--out`` (default ``runs/DATASET``);
``examples/generate.py`` turns a checkpoint into an ``.npz`` of images.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models

import gradpen

# ----------------------------------------------------------------------------- defaults, with their sources
# Paper = Gulrajani et al. 2017; resnet = gan_cifar_resnet.py, dcgan = gan_cifar.py of the official code.
# These are the defaults of --dataset cifar10 and folder.
DEFAULTS = {
    "arch": "resnet",  # the paper's best unsupervised CIFAR-10 model (Table 3)
    "image_size": 32,  # CIFAR-10
    "dim": 128,  # DIM_G = DIM_D = 128 (resnet)
    "batch_size": 64,  # critic batch (paper, Alg. 1 / Appendix F); the generator step uses 2x (GEN_BS_MULTIPLE)
    "n_critic": 5,  # critic steps per generator step (paper, Alg. 1)
    "gp_weight": 10.0,  # lambda (paper, Sec. 4 and Alg. 1)
    "iters": 100_000,  # generator steps (resnet: ITERS)
    # resnet LR = 2e-4; dcgan 1e-4; mlp (digits, not the paper's): 1e-3 at batch 256 (79.7% vs 76.0% at 5e-4)
    "lr": {"resnet": 2e-4, "dcgan": 1e-4, "mlp": 1e-3},
    "betas": {"resnet": (0.0, 0.9), "dcgan": (0.5, 0.9), "mlp": (0.5, 0.9)},  # Adam betas of each script (mlp: dcgan's)
    # resnet: linear to 0 over ITERS, dcgan: none; mlp: linear, to settle the last steps (not ablated)
    "decay": {"resnet": True, "dcgan": False, "mlp": True},
    "ema": 0.0,  # the paper samples from the raw generator
    "sample_every": 1000,
    "eval_samples": 50_000,  # 50k samples for IS/FID (paper)
}
# --dataset digits: scikit-learn's 1797 8x8 digits, for a run that gives clear digits in minutes on 2 CPU cores.
# The loss (WGAN-GP, lambda 10, 5 critic steps, 2x batch for G) stays the paper's; the scale changes (batch too).
DIGITS = {
    "arch": "mlp",  # MLPs 128-256-256-64 (G) and 64-256-256-1 (D): ~30x cheaper per step than dcgan at 32x32
    "image_size": 8,  # the digits' own size: no invented pixels (sample grids are enlarged 4x, nearest)
    "dim": 64,  # hidden width 4 * dim = 256 (dim 96, at batch 64: 68.1% at 6000 steps, not better)
    # 256, not the paper's 64: on 2 CPU cores a step of 4x the batch costs ~1.8x, and it trains better per
    # second; 6000 steps at 256 scored 76.0% recognisable, 12000 at 64 74.1% (docs/examples.md, measured)
    "batch_size": 256,
    "iters": 7000,  # generator steps: 8.7 min on 2 cores, 82.9% recognisable (6000: 7.7 min, 79.5%)
    "ema": 0.999,  # samples and eval from an EMA of G (half-life ~700 steps): averages out step-to-step jitter
    "sample_every": 1000,
    "eval_samples": 1000,  # the digits score uses 1000 samples
}
PENALTIES = ["wgan-gp", "r1", "r2", "dragan", "wgan-div"]  # the kinds of gradpen.GradientPenalty
APPROX = ["approx-r1"]  # double-backward-free: gradpen.approx_r1_penalty (finite differences)
# --backend: how gradpen gets the input gradient and its dependence on the critic's parameters
BACKENDS = {
    "autograd": "a double backward (exact; attention on the MATH kernel)",
    "func": "torch.func vmap over grad (exact; attention on the MATH kernel)",
    "fd": "first-order passes and a finite difference along the input gradient (default kernels, FSDP; smooth "
    "critics only); with --penalty r1, R1 from the loss's own forward",
}
# Flags added after the first checkpoints were written: an older checkpoint's config gets these values.
ADDED_FLAGS = {"critic": "arch", "fsdp": False, "approx_sigma": 0.01, "approx_draws": 1, "loss": "wgan",
               "vit_depth": 3, "vit_patch": 0}  # fmt: skip
# Flags that steer a run without changing what it computes: free to differ on --resume.
RUN_CONTROL = {"out", "resume", "stop_at", "log_every", "sample_every", "ckpt_every", "eval_every", "eval_samples",
               "inception_weights", "workers", "device", "data_dir", "compile"}  # fmt: skip
APPLIED_ON_RESUME = {"iters", "lr"}  # flags a resumed run applies explicitly (and records in the checkpoint)
SEED_MAX = 2**32 - 1
# approx-r1 in float32: D(x) and D(x + sigma*eps) are each rounded by about eps32*|D| (eps32 = 1.19e-7, the
# spacing at 1.0), so the quotient (D(x + sigma*eps) - D(x)) / sigma is off by about eps32*|D|/sigma. At 1e-4 that is
# 1.2e-3*|D|: ~1 % of a gradient norm of 0.1 at |D| ~ 1 (the digits runs log |g| 0.05-0.1), and x + sigma*eps is
# resolved to 6e-4 per element at |x| <= 1. Below, the error grows as 1/sigma; at 1e-7 it is the signal's size.
APPROX_SIGMA_MIN = 1e-4


def fail(message: str, code: int = 1):
    """Exit with one line on stderr (status 2 for bad flags, as argparse does)."""
    print(f"train_cifar.py: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line that names the flag (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser(explicit_only: bool = False) -> OneLineParser:
    """The flags; with ``explicit_only`` no defaults, so parsing tells which flags were given."""
    p = OneLineParser(prog="train_cifar.py", description="WGAN-GP image trainer built on gradpen.")

    def a(*flags, default=None, **kw):
        if explicit_only:
            kw["default"] = argparse.SUPPRESS
        elif kw.get("action") != "store_true":
            kw["default"] = default
        p.add_argument(*flags, **kw)

    a("--dataset", choices=["cifar10", "folder", "digits"], default="cifar10", help="training images")
    a("--data-dir", help="CIFAR-10 root (downloaded there if online) or the image folder")
    a("--image-size", type=int, help="32 (default) or 64; 8 (default) or 16 for --arch mlp")
    a("--arch", choices=sorted(models.ARCHS), help="default: resnet; mlp for --dataset digits")
    a("--critic", choices=list(models.CRITICS), default="arch", help="arch: the critic of --arch; vit: a ViT")
    a("--vit-depth", type=int, default=3, help="--critic vit: transformer blocks")
    a("--vit-patch", type=int, default=0, help="--critic vit: patch size in pixels (0: 2 for 8x8 images)")
    a("--dim", type=int, help="network width (default: 128; 64 for --dataset digits)")
    a("--batch-size", type=int, help="global critic batch (default: 64; 256 for --dataset digits)")
    a("--n-critic", type=int, default=DEFAULTS["n_critic"])
    a("--iters", type=int, help="generator steps; the LR decay runs over these (default: 100000)")
    a("--lr", type=float, help="Adam LR (default: 2e-4 resnet, 1e-4 dcgan, 1e-3 mlp)")
    a("--beta1", type=float, help="Adam beta1 (default: 0 resnet, 0.5 dcgan and mlp); beta2 is 0.9")
    a("--lr-decay", choices=["auto", "linear", "none"], default="auto", help="auto: linear for resnet and mlp")
    a("--penalty", choices=PENALTIES + APPROX, default="wgan-gp", help="gradpen penalty kind, or approx-r1")
    a(
        "--loss",
        choices=["wgan", "logistic"],
        default="wgan",
        help="wgan: D(fake) - D(real) (paper); logistic: the non-saturating loss R1 is usually paired with",
    )
    a("--gp-weight", type=float, default=DEFAULTS["gp_weight"], help="penalty weight lambda")
    a("--gp-every", type=int, default=1, help="lazy regularisation: penalty every k critic steps, times k")
    a("--center", type=float, default=1.0, help="target gradient norm (wgan-gp, dragan)")
    a("--one-sided", action="store_true", help="one-sided penalty max(0, |g| - center)^2 (Petzka et al.)")
    a("--approx-sigma", type=float, default=0.01, help="approx-r1: std of the perturbation per element")
    a("--approx-draws", type=int, default=1, help="approx-r1: perturbations per sample")
    a("--backend", choices=list(BACKENDS), default="autograd", help="gradpen backend; fd: no double backward")
    a("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast; fp16 adds a GradScaler")
    a("--ema", type=float, help="EMA decay of the generator for samples/eval (0: off; default 0, digits 0.999)")
    a("--compile", action="store_true", help="torch.compile both networks (the penalty then uses torch.func)")
    a("--fsdp", action="store_true", help="shard the critic with FSDP2 (torchrun or 1 process); exact: --backend fd")
    a("--seed", type=int, default=0, help=f"0 to {SEED_MAX}")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--out", help="output directory (default: runs/DATASET)")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--stop-at", type=int, help="checkpoint and exit at this generator step (job time limits)")
    a("--log-every", type=int, default=100, help="generator steps between log lines")
    a("--sample-every", type=int, help="generator steps between sample grids (default: 1000)")
    a("--ckpt-every", type=int, default=1000, help="generator steps between checkpoints")
    a("--eval-every", type=int, default=0, help="generator steps between evaluations (0: only at the end)")
    a("--eval-samples", type=int, help="samples per evaluation (default: 50000; digits 1000)")
    a("--inception-weights", help="local Inception weights file for torch-fidelity (offline)")
    a("--workers", type=int, default=0, help="CPU threads for decoding a folder dataset (0: main thread)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The resolved flags: explicit values, else the dataset's defaults, else the paper's.

    ``args.explicit`` is the set of flags given on the command line (``--resume`` needs it).
    """
    p = _parser()
    args = p.parse_args(argv)
    args.explicit = set(vars(_parser(explicit_only=True).parse_args(argv)))
    table = {**DEFAULTS, **DIGITS} if args.dataset == "digits" else DEFAULTS
    for name in ("arch", "dim", "batch_size", "iters", "ema", "sample_every", "eval_samples"):
        if getattr(args, name) is None:
            setattr(args, name, table[name])
    if args.image_size is None:  # digits' 8 needs the mlp networks; the others start at 32
        sizes = models.IMAGE_SIZES.get(args.arch, ())
        args.image_size = table["image_size"] if table["image_size"] in sizes else DEFAULTS["image_size"]
    if args.lr is None:
        args.lr = DEFAULTS["lr"][args.arch]
    if args.beta1 is None:
        args.beta1 = DEFAULTS["betas"][args.arch][0]
    if args.lr_decay == "auto":
        args.lr_decay = "linear" if DEFAULTS["decay"][args.arch] else "none"
    args.out = args.out or f"runs/{args.dataset}"
    check_args(p, args)
    return args


def check_args(p: OneLineParser, args: argparse.Namespace):
    """Every flag in range, or one line naming it (exit status 2)."""
    positive = ["dim", "batch_size", "n_critic", "iters", "gp_every", "log_every", "sample_every", "ckpt_every",
                "approx_draws", "vit_depth"]  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "gp_weight", "center", "ema", "beta1", "approx_sigma"):
        if not math.isfinite(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    for name in ("gp_weight", "center", "eval_every", "workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 2:
        p.error(f"--batch-size must be >= 2 (the generator has BatchNorm), got {args.batch_size}")
    if not 0 <= args.seed <= SEED_MAX:
        p.error(f"--seed must be in [0, {SEED_MAX}], got {args.seed}")
    sizes = models.IMAGE_SIZES[args.arch]
    if args.image_size not in sizes:
        p.error(f"--image-size must be {' or '.join(map(str, sizes))} for --arch {args.arch}, got {args.image_size}")
    if not 0.0 <= args.ema < 1.0:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.approx_sigma <= 0:
        p.error(f"--approx-sigma must be > 0, got {args.approx_sigma}")
    if args.approx_sigma < APPROX_SIGMA_MIN:
        p.error(
            f"--approx-sigma must be >= {APPROX_SIGMA_MIN:g}, got {args.approx_sigma:g}: in float32 the quotient "
            f"(D(x + sigma*eps) - D(x)) / sigma carries a rounding error of about 1.19e-7*|D|/sigma, 1.2e-3*|D| at "
            f"the bound (~1 % of a gradient norm of 0.1), growing as sigma shrinks"
        )
    if not 0.0 <= args.beta1 < 1.0:
        p.error(f"--beta1 must be in [0, 1), got {args.beta1}")
    if args.dataset == "folder" and not args.data_dir:
        p.error("--data-dir is required with --dataset folder")
    if args.dataset == "folder" and args.data_dir and not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir!r} is not a directory")
    if args.stop_at is not None and (args.stop_at < 1 or (not args.resume and args.stop_at > args.iters)):
        p.error(f"--stop-at must be in [1, --iters={args.iters}], got {args.stop_at}")
    if args.eval_samples < 10:
        p.error(f"--eval-samples must be >= 10, got {args.eval_samples}")
    if args.penalty in ("r1", "r2", "wgan-div", "approx-r1") and (args.one_sided or args.center != 1.0):
        p.error(f"--center/--one-sided do not apply to --penalty {args.penalty}")
    if args.penalty in APPROX and "backend" in args.explicit and not args.resume:  # resume: the checkpoint's kind
        p.error(f"--backend does not apply to --penalty {args.penalty} (it forms no input gradient)")
    if args.penalty not in APPROX and args.explicit & {"approx_sigma", "approx_draws"} and not args.resume:
        p.error(f"--approx-sigma/--approx-draws apply to --penalty approx-r1, not {args.penalty}")
    if args.critic == "vit" and args.dim % 4:
        p.error(f"--dim must be a multiple of 4 (attention heads) for --critic vit, got {args.dim}")
    if args.vit_patch < 0 or (args.vit_patch and args.image_size % args.vit_patch):
        p.error(f"--vit-patch must be 0 or divide --image-size {args.image_size}, got {args.vit_patch}")
    if args.critic != "vit" and args.explicit & {"vit_depth", "vit_patch"} and not args.resume:
        p.error("--vit-depth/--vit-patch apply to --critic vit")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        p.error(f"--inception-weights {args.inception_weights!r} is not a file")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")


def read_checkpoint(path: Path, prog: str = "train_cifar.py") -> dict:
    """``torch.load(path, weights_only=True)``, or one line naming the file and what is wrong with it."""
    err = lambda why: SystemExit(f"{prog}: error: cannot read checkpoint {str(path)!r}: {why}")
    if path.is_file() and path.stat().st_size == 0:
        raise err("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol ..." on foreign pickles
            ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except pickle.UnpicklingError as e:
        bad = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower() and "GLOBAL" in ln), None)
        why = f"it holds objects other than tensors and plain data ({bad}), which are never loaded" if bad else (
            "it is corrupt or not a PyTorch checkpoint")  # fmt: skip
        raise err(why) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise err(f"it is truncated, corrupt or not a PyTorch checkpoint ({type(e).__name__})") from None
    needed = ("config", "generator", "critic", "channels", "iter")
    if not isinstance(ck, dict) or any(k not in ck for k in needed):
        raise err(f"it is not a train_cifar.py checkpoint (expected the keys {', '.join(needed)})")
    if not isinstance(ck["config"], dict) or any(k not in ck["config"] for k in ("arch", "dim", "image_size")):
        raise err("its config has no arch, dim and image_size")
    return ck


def load_weights(module: nn.Module, state: dict, what: str, path: Path, config: dict, prog: str = "train_cifar.py"):
    """``load_state_dict``, or one line naming the checkpoint and the first mismatching tensor."""
    mine = module.state_dict()
    for k, v in state.items():
        if k in mine and isinstance(v, torch.Tensor) and v.shape != mine[k].shape:
            net = f"--arch {config['arch']} --dim {config['dim']} --image-size {config['image_size']}"
            net += f" --critic {config['critic']}" if config.get("critic", "arch") != "arch" else ""
            raise SystemExit(
                f"{prog}: error: checkpoint {str(path)!r} does not fit {net}: its {what} {k} has shape "
                f"{tuple(v.shape)}, the network {tuple(mine[k].shape)}"
            )
    missing, unexpected = set(mine) - set(state), set(state) - set(mine)
    if missing or unexpected:
        first = sorted(missing or unexpected)[0]
        raise SystemExit(
            f"{prog}: error: checkpoint {str(path)!r} does not fit --arch {config['arch']}: its {what} "
            f"{'lacks' if missing else 'has an unknown'} {first} ({len(missing)} missing, {len(unexpected)} unknown)"
        )
    module.load_state_dict(state)


def merge_resume_config(args: argparse.Namespace, ck: dict, path: Path) -> tuple[argparse.Namespace, list]:
    """The checkpoint's config, with the run-control flags given now and ``--iters``/``--lr`` applied.

    Any other flag given now that differs from the checkpoint is refused with one line naming the
    flags and both values. Returns the merged config and the list of applied changes.
    """
    saved = {**ADDED_FLAGS, **ck["config"]}
    merged = argparse.Namespace(**saved)
    differ, applied = [], []
    for name in sorted(args.explicit):
        new, old = getattr(args, name), saved.get(name)
        if name in RUN_CONTROL or name == "explicit":
            setattr(merged, name, new)
        elif new != old and name in APPLIED_ON_RESUME:
            applied.append({"iter": ck["iter"], "flag": f"--{name.replace('_', '-')}", "old": old, "new": new})
            setattr(merged, name, new)
        elif new != old:
            differ.append(f"--{name.replace('_', '-')} {new} (checkpoint: {old})")
    if differ:
        fail(
            f"--resume: {', '.join(differ)} differ from the checkpoint {str(path)!r}; drop them to continue "
            "that run, or start a new one with another --out",
            code=2,
        )
    merged.resume, merged.explicit = True, args.explicit
    merged.stop_at = args.stop_at if "stop_at" in args.explicit else None
    if merged.stop_at is not None and merged.stop_at <= ck["iter"]:
        fail(f"--stop-at {merged.stop_at} is not after the checkpoint's step {ck['iter']} ({str(path)!r})", code=2)
    if merged.stop_at is not None and merged.stop_at > merged.iters:
        fail(f"--stop-at must be in [1, --iters={merged.iters}], got {merged.stop_at}", code=2)
    return merged, applied


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


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def warn(message: str):
    print(f"train_cifar.py: warning: {message}", file=sys.stderr)


def decode_image(path: Path, size: int) -> torch.Tensor:
    """One image file -> uint8 (3, size, size): resized (short side) and center-cropped; 16-bit scaled to 8."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale 0..65535 to 0..255
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
        im = TF.center_crop(TF.resize(im.convert("RGB"), size), size)
        return TF.pil_to_tensor(im)


def load_folder(root: Path, size: int, workers: int) -> torch.Tensor:
    """Every image under ``root``; unreadable files and macOS ``._*`` resource forks are skipped with a warning."""
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not p.is_file():
            warn(f"skipping {str(p)!r}: not a file")
        elif p.name.startswith("._"):
            warn(f"skipping {str(p)!r}: a macOS resource fork (._ file), not an image")
        else:
            files.append(p)
    if not files:
        raise SystemExit(f"train_cifar.py: error: --data-dir {str(root)!r} holds no .png/.jpg/.jpeg/.bmp/.webp images")

    def decode(path):
        try:
            return decode_image(path, size)
        except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), ...
            warn(f"skipping {str(path)!r}: cannot decode it ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            return None

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        images = [x for x in pool.map(decode, files) if x is not None]
    if not images:
        raise SystemExit(f"train_cifar.py: error: no image under --data-dir {str(root)!r} could be decoded")
    return torch.stack(images)


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
    if world == 1 and args.fsdp:  # FSDP2 needs a process group, also of one process (legal: nothing is sharded)
        dist.init_process_group(
            "nccl" if args.device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    if world == 1:
        return 0, 1, torch.device(args.device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return rank, world, torch.device(args.device, local) if args.device == "cuda" else torch.device("cpu")


def save_atomic(obj, path: Path):
    """Write to a temporary file in the same directory, fsync, then os.replace: never a half-written file.

    On failure (a full disk, ...) the temporary file is removed, the previous file is kept, and the
    run stops with one line naming the file and the cause.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = e.strerror or str(e) or type(e).__name__
        raise SystemExit(
            f"train_cifar.py: error: could not write {str(path)!r}: {cause}; the previous file is kept"
        ) from None


def read_metrics(path: Path, upto: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to generator step ``upto``; a half-written line is dropped with a warning."""
    keep = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            it = int(rec["iter"])
        except (ValueError, KeyError, TypeError):
            warn(f"dropping line {n} of {str(path)!r}: not a complete JSON record (an interrupted write?)")
            continue
        if it <= upto:
            keep.append(line + "\n")
    return keep


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


class ApproxR1(nn.Module):
    """``--penalty approx-r1``: weight * gradpen.approx_r1_penalty, called like gradpen.GradientPenalty.

    GradientPenalty holds the exact kinds; this keeps its face for the loop: lazy regularisation
    (computed on one call in ``every``, times ``every``), the call counter in ``state_dict()`` (exact
    resume) and ``last_norms`` (the estimated norms, logged as ``grad_norm``). The estimate has the
    mean of exact R1's E||grad D(real)||^2, so the same weight applies.
    """

    def __init__(self, weight: float, sigma: float, draws: int, every: int):
        super().__init__()
        self.weight, self.sigma, self.draws, self.every = weight, sigma, draws, every
        self.calls, self.last_norms = 0, None

    def forward(self, critic, real, fake, scaler=None):  # R1 uses no fake; no input gradient, so no GradScaler
        if self.calls % self.every:
            self.calls += 1
            return torch.zeros((), device=real.device)
        est, norms = gradpen.approx_r1_penalty(critic, real, sigma=self.sigma, draws=self.draws, return_norms=True)
        self.calls += 1
        self.last_norms = norms
        return est * (self.weight * self.every)

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict):
        self.calls = int(state["calls"])


class FromForwardR1(nn.Module):
    """``--penalty r1 --backend fd``: weight * R1 taken from the loss's own forward, as StyleGAN2 and R3GAN do.

    The critic step makes the real batch a leaf, runs the critic once on [real, fake], and this takes
    ``gradpen.gradient_norms_from(d_real, real, critic=critic, backend="fd")``: the exact R1 value, its
    parameter gradient from the critic at real +- h u, no double backward and no second forward at the
    real batch. Lazy regularisation, the call counter and ``last_norms`` as in gradpen.GradientPenalty,
    whose state_dict format it keeps.
    """

    from_forward = True

    def __init__(self, weight: float, every: int):
        super().__init__()
        self.weight, self.every = weight, every
        self.calls, self.last_norms = 0, None

    def forward(self, critic, real, d_real, scaler=None):
        if self.calls % self.every:
            self.calls += 1
            return torch.zeros((), device=real.device)
        norms = gradpen.gradient_norms_from(d_real, real, critic=critic, backend="fd", scaler=scaler)
        self.calls += 1
        self.last_norms = norms.detach()
        return norms.square().mean() * (self.weight * self.every)

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict):
        self.calls = int(state["calls"])


def build_penalty(args) -> nn.Module:
    """The penalty module of the flags: gradpen.GradientPenalty, or the trainer's ApproxR1 / FromForwardR1."""
    if args.penalty in APPROX:
        return ApproxR1(args.gp_weight, args.approx_sigma, args.approx_draws, every=args.gp_every)
    if args.penalty == "r1" and args.backend == "fd":
        return FromForwardR1(args.gp_weight, every=args.gp_every)
    return gradpen.GradientPenalty(
        args.gp_weight, args.center, args.one_sided, kind=args.penalty, backend=args.backend, every=args.gp_every
    )


def penalty_term(penalty, critic, real, fake, scores, scaler):
    """lambda * penalty for one critic step (0 on lazy-skipped steps); R1 from the loss's forward uses its scores."""
    if getattr(penalty, "from_forward", False):
        return penalty(critic, real, scores[: real.shape[0]], scaler=scaler)
    return penalty(critic, real, fake, scaler=scaler)


def refused_by_gradpen(args, critic, batch) -> str | None:
    """What gradpen refuses for this critic and these flags, found on a few real images before step 1.

    The penalty is computed once (its value unused; under FSDP backpropagated, then the gradients cleared,
    so that FSDP ends its forward-backward cycle on every rank): FSDP and static-graph DDP for the exact backends,
    kinked critics for fd (the mlp and dcgan critics use LeakyReLU), a sigma below the resolution of the
    --amp dtype for approx-r1. Returns the one-line message with this trainer's alternatives, or None.
    """
    flags = f"--penalty {args.penalty}" + ("" if args.penalty in APPROX else f" --backend {args.backend}")
    flags += " --fsdp" if args.fsdp else ""
    flags += f" --amp {args.amp}" if args.amp != "none" else ""
    amp = torch.autocast(batch.device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "none")  # fmt: skip
    try:
        with amp:
            if args.penalty in APPROX:
                value = gradpen.approx_r1_penalty(critic, batch, sigma=args.approx_sigma, draws=args.approx_draws)
            else:
                value = gradpen.gradient_norms(critic, batch, backend=args.backend).square().mean()
        if args.fsdp:  # FSDP2 keeps the root's parameters unsharded until a backward: finish its cycle
            value.backward()
            critic.zero_grad(set_to_none=True)
    except (gradpen.UnsupportedCriticError, ValueError) as e:
        if args.penalty in APPROX:
            here = "In this trainer: a larger --approx-sigma, or --amp none."
        elif args.backend == "fd":
            here = "In this trainer: --critic vit (GELU and LayerNorm: smooth), or --backend autograd without --fsdp."
        else:
            here = ("In this trainer: --backend fd with a smooth critic (--critic vit), --penalty approx-r1, or no "
                    "--fsdp (DDP under torchrun).")  # fmt: skip
        return f"{flags}: {' '.join(str(e).split())} {here}"
    return None


LOG_KEYS = ["loss_d", "wasserstein", "gp", "grad_norm", "loss_g"]  # the sums kept for a log line
FP16_OVERFLOW_STREAK = 50  # fp16: this many non-finite critic steps in a row is a divergence, not an overflow


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    if not args.resume and ckpt_path.exists():
        fail(f"{ckpt_path} exists; pass --resume to continue it or pick another --out", code=2)
    if args.resume and not ckpt_path.exists():
        fail(f"--resume given but {ckpt_path} does not exist", code=2)
    # The checkpoint is read before any process group exists: its config (--fsdp) decides the distributed set-up,
    # and every exit before training leaves no group behind. WORLD_SIZE and RANK are torchrun's (1 and 0 without).
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    ck, applied = None, []
    if args.resume:
        ck = read_checkpoint(ckpt_path)
        device_flag = args.device  # this machine's --device (auto by default), not the one the checkpoint ran on
        args, applied = merge_resume_config(args, ck, ckpt_path)
        args.device = device_flag
        applied = ck.get("applied", []) + applied
        if ck["world"] != world:
            fail(f"the checkpoint was written by {ck['world']} rank(s), not {world}")
        if ck["iter"] >= args.iters:
            if rank == 0:
                print(f"{ckpt_path} is already at generator step {ck['iter']} of --iters {args.iters}: nothing to do")
            return
    if args.batch_size % world or args.batch_size // world < 2:
        fail(f"--batch-size {args.batch_size} must split into >= 2 samples on each of {world} ranks", code=2)
    rank, world, device = setup_distributed(args)
    if rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)  # same initial weights on every rank
    images = load_images(args)
    channels = images.shape[1]
    gen, critic = models.build(
        args.arch, args.dim, args.image_size, channels, args.critic, args.vit_depth, args.vit_patch
    )
    gen, critic = gen.to(device), critic.to(device)
    ema = copy.deepcopy(gen).eval().requires_grad_(False) if args.ema > 0 else None
    if ck is not None:  # the weights before wrapping: DDP broadcasts them, fully_shard shards them
        if ck.get("images") not in (None, len(images)):
            fail(f"the dataset has {len(images)} images; the checkpoint {str(ckpt_path)!r} trained on {ck['images']}")
        load_weights(gen, ck["generator"], "generator", ckpt_path, ck["config"])
        load_weights(critic, ck["critic"], "critic", ckpt_path, ck["config"])
        if ema is not None:
            load_weights(ema, ck["ema"], "EMA generator", ckpt_path, ck["config"])
    if args.fsdp:  # FSDP2: each rank keeps a shard of every critic parameter (DTensors); G stays replicated
        fully_shard(critic, mesh=init_device_mesh(device.type, (world,)))
        gen = DDP(gen) if world > 1 else gen
    elif world > 1:
        gen, critic = DDP(gen), DDP(critic)  # broadcast rank 0's weights; gradients are averaged
    bare = critic.module if isinstance(critic, DDP) else critic  # DDP: no forward without its backward; FSDP: all ranks
    refusal = refused_by_gradpen(args, bare, to_unit(images[:16], device))  # asked before step 1, in one line
    if refusal is not None:
        if rank == 0:
            print(f"train_cifar.py: error: {refusal}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(2)
    if args.compile:
        gen, critic = torch.compile(gen), torch.compile(critic)
    betas = (args.beta1, DEFAULTS["betas"][args.arch][1])  # beta2 = 0.9 in both scripts
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=args.lr, betas=betas)
    decay = (lambda it: max(0.0, 1.0 - it / args.iters)) if args.lr_decay == "linear" else (lambda it: 1.0)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, decay)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, decay)
    penalty = build_penalty(args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    fixed_z = torch.randn(100, models.Z_DIM, generator=torch.Generator().manual_seed(args.seed)).to(device)

    start, consumed = 0, 0
    acc = torch.zeros(len(LOG_KEYS), device=device, dtype=torch.float64)  # sums for the log line, synced when logging
    acc_n = torch.zeros(4, device=device, dtype=torch.float64)  # finite G steps, D steps, D steps with penalty; G steps
    if ck is not None:
        for obj, key in [(opt_g, "opt_g"), (sched_g, "sched_g"), (sched_d, "sched_d"), (penalty, "penalty"),
                         (scaler, "scaler")]:  # fmt: skip
            obj.load_state_dict(ck[key])
        if args.fsdp:  # the checkpoint holds the full optimizer state (keyed by parameter name): shard it
            set_optimizer_state_dict(unwrap(critic), opt_d, ck["opt_d"], options=StateDictOptions(full_state_dict=True))
        else:
            opt_d.load_state_dict(ck["opt_d"])
        for change in applied:
            if change["iter"] == ck["iter"] and change["flag"] == "--lr":  # applied now: restart the decay from it
                for sched in (sched_g, sched_d):
                    sched.base_lrs = [args.lr for _ in sched.base_lrs]
                    for group in sched.optimizer.param_groups:
                        group["initial_lr"], group["lr"] = args.lr, args.lr * decay(ck["iter"])
        start, consumed = ck["iter"], ck["batches"][rank]
        if "log" in ck:
            acc.copy_(ck["log"]["acc"][rank])
            acc_n.copy_(ck["log"]["n"][rank])
        set_rng_state(ck["rng"][rank], device)
        if rank == 0:
            print(f"resumed from {ckpt_path} at generator step {start}")
            for change in applied:
                if change["iter"] == start:
                    print(f"applied {change['flag']} {change['new']} (the checkpoint had {change['old']})")
    else:
        torch.manual_seed(args.seed + rank)  # different noise and alpha on every rank

    per_rank = args.batch_size // world
    if device.type == "cuda":
        images = images.to(device)  # CIFAR-10 is 150 MB as uint8: keep it on the GPU
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # one clean log: a resumed run drops lines after the checkpoint, a fresh run starts anew
        old = read_metrics(metrics_path, start) if args.resume and metrics_path.exists() else []
        if not args.resume and metrics_path.exists() and metrics_path.stat().st_size:
            warn(f"{str(metrics_path)!r} of an earlier run without a checkpoint is started anew")
        tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
        tmp.write_text("".join(old))
        os.replace(tmp, metrics_path)
    batches = ShardedBatches(len(images), per_rank, args.seed, rank, world, consumed)
    flip = args.dataset != "digits"  # horizontal flips for natural images, never for digits
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
        if args.amp != "none"
        else contextlib.nullcontext()
    )

    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if args.resume else None)
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
        logs = [None] * world
        mine = {"acc": acc.cpu(), "n": acc_n.cpu()}
        if world > 1:
            dist.all_gather_object(rngs, rng_state(device))
            dist.all_gather_object(counts, batches.consumed)
            dist.all_gather_object(logs, mine)
        else:
            rngs, counts, logs = [rng_state(device)], [batches.consumed], [mine]
        if args.fsdp:  # collective: the full critic and its optimizer state, gathered to rank 0's CPU
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            critic_state = get_model_state_dict(unwrap(critic), options=full)
            opt_d_state = get_optimizer_state_dict(unwrap(critic), opt_d, options=full)
        else:
            critic_state, opt_d_state = unwrap(critic).state_dict(), opt_d.state_dict()
        if rank == 0:
            config = {k: v for k, v in vars(args).items() if k != "explicit"}
            state = {
                "generator": unwrap(gen).state_dict(), "critic": critic_state,
                "ema": ema.state_dict() if ema is not None else None,
                "opt_g": opt_g.state_dict(), "opt_d": opt_d_state,
                "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
                "penalty": penalty.state_dict(), "scaler": scaler.state_dict(),
                "rng": rngs, "batches": counts, "iter": it, "config": config, "world": world, "channels": channels,
                "images": len(images), "applied": applied,
                "log": {"acc": [x["acc"] for x in logs], "n": [x["n"] for x in logs]},
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

        if x.shape[-1] < 32:  # small images (digits at 8x8 or 16x16): enlarge the pixels, do not blur them
            x = F.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
        save_image(x * 0.5 + 0.5, out / "samples" / f"iter_{it:06d}.png", nrow=10)

    bad = torch.zeros((), dtype=torch.bool, device=device)  # a divergence since the last check
    streak = torch.zeros((), dtype=torch.int64, device=device)  # fp16: consecutive non-finite critic steps
    fp16 = args.amp == "fp16"
    if fp16:  # a step the GradScaler skips (overflow) makes the schedulers warn about their order; it is expected
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    steps_timed, t_last, it = 0, time.perf_counter(), start
    saved_at = start if ck is not None else None  # the generator step of the last checkpoint on disk
    metrics = open(metrics_path, "a") if rank == 0 else None  # noqa: SIM115
    try:
        for it in range(start + 1, args.iters + 1):
            # ---- critic: n_critic steps of  D(fake) - D(real) + lambda * penalty  (paper, Alg. 1)
            #      or, --loss logistic, softplus(D(fake)) + softplus(-D(real)) + lambda * penalty
            critic.requires_grad_(True)
            for _ in range(args.n_critic):
                real = images[batches.next()]
                real = to_unit(real, device)
                if flip:
                    real = torch.where(torch.rand(per_rank, 1, 1, 1, device=device) < 0.5, real.flip(3), real)
                z = torch.randn(per_rank, models.Z_DIM, device=device)
                with torch.no_grad(), amp:
                    fake = gen(z).float()
                active = penalty.calls % penalty.every == 0  # lazy regularisation: does this call compute it?
                real.requires_grad_(getattr(penalty, "from_forward", False))  # a leaf before the forward R1 comes from
                with amp:
                    scores = critic(torch.cat([real, fake])).float()
                    d_real, d_fake = scores[:per_rank].mean(), scores[per_rank:].mean()
                    gp = penalty_term(penalty, critic, real, fake, scores, scaler)  # lambda * penalty (0 when lazy)
                if args.loss == "wgan":
                    loss_d = d_fake - d_real + gp
                else:
                    loss_d = F.softplus(scores[per_rank:]).mean() + F.softplus(-scores[:per_rank]).mean() + gp
                opt_d.zero_grad(set_to_none=True)
                scaler.scale(loss_d).backward()
                scaler.step(opt_d)
                scaler.update()
                finite = torch.isfinite(loss_d)
                if fp16:  # the GradScaler skips a step with inf/NaN gradients and lowers its scale
                    streak = (streak + 1) * ~finite
                    bad |= streak >= FP16_OVERFLOW_STREAK
                else:
                    bad |= ~finite
                norms = penalty.last_norms.mean() if active else torch.zeros((), device=device)
                step = torch.stack([loss_d, d_real - d_fake, gp, norms, torch.zeros((), device=device)])
                acc += torch.where(finite, step.double().detach(), 0.0)  # fp16: skipped steps are not averaged
                acc_n[1:3] += torch.stack([finite, finite & active]).double()
            # ---- generator: one step of -D(G(z)) (logistic: softplus(-D(G(z)))) on a 2x batch (GEN_BS_MULTIPLE = 2)
            critic.requires_grad_(False)
            z = torch.randn(2 * per_rank, models.Z_DIM, device=device)
            with amp:
                d_gen = unwrap(critic)(gen(z)).float()  # the bare critic: no DDP sync of its unused grads
                loss_g = -d_gen.mean() if args.loss == "wgan" else F.softplus(-d_gen).mean()
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
            if not fp16:
                bad |= ~torch.isfinite(loss_g)
            acc[4] += torch.where(torch.isfinite(loss_g), loss_g.double().detach(), 0.0)
            acc_n[0::3] += torch.stack([torch.isfinite(loss_g).double(), torch.ones((), device=device)])
            steps_timed += 1

            boundary = it % args.log_every == 0 or it % args.ckpt_every == 0 or it == args.iters or it == args.stop_at
            if not boundary:
                if progress is not None:
                    progress.update(1)
                continue
            weights = [p.to_local() if isinstance(p, DTensor) else p for m in (gen, critic) for p in m.parameters()]
            bad |= ~torch.stack([torch.isfinite(p).all() for p in weights]).all()  # NaN weights: diverged
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                kept = (
                    f"the last good checkpoint {ckpt_path} (generator step {saved_at}) is kept"
                    if saved_at is not None
                    else f"no checkpoint was written yet (--ckpt-every {args.ckpt_every})"
                )
                raise FloatingPointError(
                    f"non-finite loss or weights between generator steps {it - int(acc_n[3].item()) + 1} and {it} "
                    f"(try a smaller --lr, --amp none, or check the data); {kept}"
                )
            if it % args.log_every == 0 or it == args.iters:
                n_gen, n_crit, n_pen, _ = acc_n.tolist()
                counts = [n_crit, n_crit, n_crit, n_pen, n_gen]  # grad_norm: over the steps that computed it
                mean = [v / n if n else float("nan") for v, n in zip(acc.tolist(), counts, strict=True)]
                now = time.perf_counter()
                img_s = steps_timed * args.n_critic * args.batch_size / (now - t_last)
                rec = {
                    "iter": it, "loss_d": mean[0], "wasserstein": mean[1], "gp": mean[2],
                    "grad_norm": mean[3] if n_pen else None, "loss_g": mean[4], "lr": sched_g.get_last_lr()[0],
                    "img_per_s": img_s,
                }  # fmt: skip
                if fp16:
                    rec["scale"] = scaler.get_scale()
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
                            if k != "iter" and v is not None:
                                writer.add_scalar(k, v, it)
                acc.zero_()
                acc_n.zero_()
                steps_timed, t_last = 0, now
            if progress is not None:
                progress.set_postfix(D=f"{loss_d.item():.3f}", G=f"{loss_g.item():.3f}", refresh=False)
                progress.update(1)
            if rank == 0 and (it % args.sample_every == 0 or it == args.iters):
                sample_grid(it)
            if args.eval_every and it % args.eval_every == 0 and it != args.iters:
                evaluate(args, ema if ema is not None else unwrap(gen), images, device, it, rank, metrics, writer)
            if it == args.iters:  # evaluate before the last checkpoint: a finished checkpoint is never re-evaluated
                evaluate(args, ema if ema is not None else unwrap(gen), images, device, it, rank, metrics, writer)
            if it % args.ckpt_every == 0 or it == args.iters or it == args.stop_at:
                checkpoint(it)
                saved_at = it
            if it == args.stop_at:
                if rank == 0:
                    print(f"stopped at generator step {it} (--stop-at); continue with --resume")
                break
        if world > 1:
            check_replicas(unwrap(gen), None if args.fsdp else unwrap(critic), rank)
            dist.barrier()  # every rank done with its collectives before any tears the group down
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def check_replicas(gen, critic, rank):
    """Every rank must hold bit-identical weights after a DDP run; raise otherwise (``critic=None``: sharded)."""
    nets = (gen,) if critic is None else (gen, critic)
    mine = torch.cat([p.detach().reshape(-1).double().cpu() for m in nets for p in m.parameters()])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine.to(next(gen.parameters()).device))
    same = all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)
    what = " of the generator; the critic is sharded (FSDP)" if critic is None else ""
    if rank == 0:
        print(f"DDP replicas identical: {same} ({dist.get_world_size()} ranks, {mine.numel()} parameters{what})")
    if not same:
        raise RuntimeError("DDP replicas diverged: the ranks hold different weights")


# ----------------------------------------------------------------------------- evaluation


def generate(g: nn.Module, n: int, device, seed: int, batch: int = 500) -> torch.Tensor:
    """n samples in [-1, 1], float32, on the CPU, from noise of its own generator (the training RNG is untouched)."""
    rng = torch.Generator().manual_seed(seed)
    was_training = g.training
    g.eval()
    with torch.no_grad():
        out = []
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), models.Z_DIM, generator=rng).to(device)
            out.append(g(z).float().cpu())
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
    fake = generate(g, args.eval_samples, device, seed=args.seed + 1)  # the same noise at every evaluation
    if args.dataset == "digits":
        import digits_score

        result = digits_score.score(fake, args.image_size)
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
