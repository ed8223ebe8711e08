"""What reusing the critic's forward saves: R1, R1 + R2 and WGAN-GP steps, separate forwards vs shared.

    python benchmarks/bench_shared_forward.py                  # CPU: DCGAN and ResNet critics, batch 64
    python benchmarks/bench_shared_forward.py --device cuda    # on a GPU (adds peak memory)
    python benchmarks/bench_shared_forward.py --quick          # tiny models, a few reps: checks that it runs

One critic update each (loss + penalty + backward + Adam step), for the trainer's DCGAN and ResNet
critics (examples/models.py) on 3x32x32 images:

    r1 plain        non-saturating loss, softplus(D(fake)) + softplus(-D(real)), no penalty
    r1 separate     + (gamma/2) gradpen.r1_penalty(D, real): a forward of its own
    r1 shared       + (gamma/2) gradient_norms_from(D(real), real)^2: the loss's forward
    r1r2 plain      R3GAN's relativistic pairing loss softplus(D(fake) - D(real))
    r1r2 separate   + (gamma/2) (r1_penalty(D, real) + r2_penalty(D, fake))
    r1r2 shared     + the same from the loss's two forwards
    wgan plain      D(fake).mean() - D(real).mean()
    wgan gp         + 10 gradpen.gradient_penalty(D, real, fake): three forwards
    wgan gp fused   one forward over cat([real, fake, x_hat]); the penalty from its last N scores

Interleaved medians (benchmarks/_timing.py); nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

import gradpen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models
from _timing import machine, peak_mib, time_variants

GAMMA = 10.0  # R1/R2 weight gamma (applied as gamma / 2); the cost does not depend on it
LAMBDA = 10.0  # WGAN-GP weight (paper)


def leaf(x):
    return x.detach().requires_grad_(True)


def r1_plain(D, real, fake):
    return F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()


def r1_separate(D, real, fake):
    return r1_plain(D, real, fake) + GAMMA / 2 * gradpen.r1_penalty(D, real)


def r1_shared(D, real, fake):
    real = leaf(real)
    d_real = D(real)
    r1 = gradpen.gradient_norms_from(d_real, real).square().mean()
    return F.softplus(D(fake)).mean() + F.softplus(-d_real).mean() + GAMMA / 2 * r1


def r1r2_plain(D, real, fake):
    return F.softplus(D(fake) - D(real)).mean()


def r1r2_separate(D, real, fake):
    return r1r2_plain(D, real, fake) + GAMMA / 2 * (gradpen.r1_penalty(D, real) + gradpen.r2_penalty(D, fake))


def r1r2_shared(D, real, fake):
    real, fake = leaf(real), leaf(fake)
    d_real, d_fake = D(real), D(fake)
    r1 = gradpen.gradient_norms_from(d_real, real).square().mean()
    r2 = gradpen.gradient_norms_from(d_fake, fake).square().mean()
    return F.softplus(d_fake - d_real).mean() + GAMMA / 2 * (r1 + r2)


def wgan_plain(D, real, fake):
    return D(fake).mean() - D(real).mean()


def wgan_gp(D, real, fake):
    return wgan_plain(D, real, fake) + LAMBDA * gradpen.gradient_penalty(D, real, fake)


def wgan_gp_fused(D, real, fake):
    n = real.shape[0]
    x_hat = leaf(gradpen.interpolate(real, fake))
    scores = D(torch.cat([real, fake, x_hat]))
    gp = (gradpen.gradient_norms_from(scores[2 * n :], x_hat) - 1).square().mean()
    return scores[n : 2 * n].mean() - scores[:n].mean() + LAMBDA * gp


GROUPS = {
    "r1": {"plain": r1_plain, "separate": r1_separate, "shared": r1_shared},
    "r1r2": {"plain": r1r2_plain, "separate": r1r2_separate, "shared": r1r2_shared},
    "wgan": {"plain": wgan_plain, "gp": wgan_gp, "gp fused": wgan_gp_fused},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny models and few reps: checks that it runs")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; 1 with --quick)")
    parser.add_argument("--block", type=int, default=4, help="updates per timed block (default 4)")
    parser.add_argument("--only", default=None, help="comma-separated subset of: dcgan,resnet")
    parser.add_argument("--out", default=None, help="Markdown output (default: print only)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if (args.reps is not None and args.reps < 1) or args.block < 1:
        parser.error("--reps and --block must be >= 1")
    device = torch.device(args.device)
    reps, warmup = (args.reps or 1, 1) if args.quick else (args.reps or 5, 1)
    block = 1 if args.quick else args.block
    dim, batch = (8, 8) if args.quick else (128, 64)
    cases = {"dcgan": models.DCGANCritic, "resnet": models.ResNetCritic}
    chosen = args.only.split(",") if args.only else list(cases)
    for c in chosen:
        if c not in cases:
            parser.error(f"--only: unknown critic {c!r}; expected some of {sorted(cases)}")

    rows, summary = [], []
    for key in chosen:
        torch.manual_seed(0)
        critic = cases[key](dim).to(device)
        data = (torch.randn(batch, 3, 32, 32, device=device), torch.randn(batch, 3, 32, 32, device=device))
        variants = {f"{g} {v}": (copy.deepcopy(critic), fn) for g, fns in GROUPS.items() for v, fn in fns.items()}
        print(f"benchmarking {key} critic dim {dim}, batch {batch} on {device} ...", flush=True)
        med, peak = time_variants(variants, data, device, reps, warmup, block)
        label = f"{key} dim {dim}, batch {batch}"
        for name in variants:
            plain = med[name.split()[0] + " plain"]
            rows.append((label, name, med[name] * 1e3, med[name] / plain, peak_mib(peak, name)))
        for g, (sep, shared) in {"r1": ("separate", "shared"), "r1r2": ("separate", "shared"),
                                 "wgan": ("gp", "gp fused")}.items():  # fmt: skip
            a, b, p = med[f"{g} {sep}"], med[f"{g} {shared}"], med[f"{g} plain"]
            summary.append((key, g, a / p, b / p, b / a))

    lines = [
        f"Measured on {machine(device)}; torch {torch.__version__}, gradpen {gradpen.__version__}; median of "
        f"{reps} interleaved repetitions of {block} critic updates each, after {warmup} warm-up"
        f"{' (--quick: tiny models, not representative)' if args.quick else ''}.",
        "",
        "| critic | variant | ms / update | × plain step | peak MiB |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {c} | {v} | {ms:.1f} | {r:.2f} | {m} |" for c, v, ms, r, m in rows]
    lines += [
        "",
        "| critic | step | separate / plain | shared / plain | shared / separate |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {c} | {g} | {a:.2f} | {b:.2f} | {r:.2f} |" for c, g, a, b, r in summary]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
