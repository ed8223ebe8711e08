"""What the double-backward-free R1 costs, and how well its parameter gradient agrees with the exact one.

    python benchmarks/bench_approx.py                  # CPU: DCGAN and ResNet critics, batch 64
    python benchmarks/bench_approx.py --only dcgan     # one critic
    python benchmarks/bench_approx.py --quick          # tiny models, a few reps: checks that it runs

Cost. For each critic (the trainer's DCGAN and ResNet critics, 3x32x32, batch 64) it times one critic
update, WGAN loss + weight * penalty + backward + Adam step, for:

    plain          the WGAN critic step, no penalty: one forward over [fake, real]
    plain-2fwd     the same step with two forwards, D(fake) and D(real) (how many trainers write it)
    exact-r1       gradpen.r1_penalty (double backward)
    approx         gradpen.approx_r1_penalty(draws=1), forward scheme: one fused forward over [x, x + s eps]
    approx-central gradpen.approx_r1_penalty(draws=1, scheme="central")
    approx-d4      gradpen.approx_r1_penalty(draws=4)
    approx-from    gradpen.approx_squared_norms_from: the loss and the forward-scheme estimate from ONE critic
                   forward over [fake, real, real + s eps] (the loss's D(real) is reused)

Every repetition runs a block of updates of each variant in a shuffled order (interleaved), after
warm-up; the table gives the median time per update and ratios of medians within the run.

Agreement. For the same critics (PyTorch's default init, untrained) and one batch of 64 Gaussian images,
the cosine between the parameter gradient of approx_r1_penalty and that of r1_penalty, for draws = 1, 4,
16, as the mean over independent calls (each with fresh eps), and the norm ratio.
Nothing here is asserted: this is a measurement, printed and written as Markdown.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gradpen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models

WEIGHT = 5.0  # gamma / 2 with gamma = 10; the same weight for exact and approx R1 (same quantity)
SIGMA = 0.01  # the default: a standard deviation per element


def make_variants():
    """name -> loss function(critic, real, fake)."""

    def plain(c, real, fake):  # one forward over [fake, real], as the trainer's critic step
        d_fake, d_real = c(torch.cat([fake, real])).chunk(2)
        return d_fake.mean() - d_real.mean()

    def approx(**kw):
        return lambda c, real, fake: plain(c, real, fake) + WEIGHT * gradpen.approx_r1_penalty(c, real, **kw)

    def approx_from(c, real, fake):
        d_fake, d_real, d_pert = c(torch.cat([fake, real, real + SIGMA * torch.randn_like(real)])).chunk(3)
        r1 = gradpen.approx_squared_norms_from(d_real, d_pert, sigma=SIGMA).mean()
        return d_fake.mean() - d_real.mean() + WEIGHT * r1

    return {
        "plain": plain,
        "plain-2fwd": lambda c, real, fake: c(fake).mean() - c(real).mean(),
        "exact-r1": lambda c, real, fake: plain(c, real, fake) + WEIGHT * gradpen.r1_penalty(c, real),
        "approx": approx(),
        "approx-central": approx(scheme="central"),
        "approx-d4": approx(draws=4),
        "approx-from": approx_from,
    }


def bench_cost(critic, batch, reps, warmup, block, names):
    torch.manual_seed(0)
    data = (torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32))
    variants = {v: fn for v, fn in make_variants().items() if v in names}
    copies = {v: copy.deepcopy(critic) for v in variants}
    opts = {v: torch.optim.Adam(c.parameters(), lr=1e-4, betas=(0.0, 0.9)) for v, c in copies.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for rep in range(warmup + reps):
        random.Random(rep).shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            for _ in range(block):
                opts[v].zero_grad(set_to_none=True)
                variants[v](copies[v], *data).backward()
                opts[v].step()
            if rep >= warmup:
                times[v].append((time.perf_counter() - t0) / block)
    return {v: statistics.median(t) for v, t in times.items()}


def flat_grad(critic):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in critic.parameters()])


def bench_agreement(critic, batch, calls, draws_list):
    torch.manual_seed(1)
    real = torch.randn(batch, 3, 32, 32)
    critic.zero_grad(set_to_none=True)
    gradpen.r1_penalty(critic, real).backward()
    exact = flat_grad(critic)
    rows = []
    g = torch.Generator().manual_seed(2)
    for draws in draws_list:
        cos, ratio = [], []
        for _ in range(calls):
            critic.zero_grad(set_to_none=True)
            gradpen.approx_r1_penalty(critic, real, draws=draws, generator=g).backward()
            got = flat_grad(critic)
            cos.append(F.cosine_similarity(got, exact, dim=0).item())
            ratio.append((got.norm() / exact.norm()).item())
        rows.append((draws, statistics.mean(cos), min(cos), max(cos), statistics.mean(ratio)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few reps: checks that it runs")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; 1 with --quick)")
    parser.add_argument("--block", type=int, default=None, help="updates per timed block (default 4; 1 with --quick)")
    parser.add_argument("--calls", type=int, default=None, help="calls per draws setting (default 8; 1 with --quick)")
    parser.add_argument("--only", default=None, help="comma-separated subset of: dcgan,resnet")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the timed variants (default: all)")
    parser.add_argument("--out", default=None, help="Markdown output (default: benchmarks/results_approx_cpu.md)")
    args = parser.parse_args(argv)
    for flag in ("reps", "block", "calls"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    reps = args.reps or (1 if args.quick else 7)
    block = args.block or (1 if args.quick else 4)
    calls = args.calls or (1 if args.quick else 8)
    warmup = 1
    dim, batch = (8, 8) if args.quick else (128, 64)
    cases = {
        "dcgan": (f"DCGAN critic dim {dim}, batch {batch}", models.DCGANCritic(dim)),
        "resnet": (f"ResNet critic dim {dim}, batch {batch}", models.ResNetCritic(dim)),
    }
    chosen = args.only.split(",") if args.only else list(cases)
    for c in chosen:
        if c not in cases:
            parser.error(f"--only: unknown critic {c!r}; expected some of {sorted(cases)}")

    names = args.variants.split(",") if args.variants else list(make_variants())
    for v in names:
        if v not in make_variants():
            parser.error(f"--variants: unknown {v!r}; expected some of {list(make_variants())}")
    names = ["plain", "exact-r1", *[v for v in names if v not in ("plain", "exact-r1")]]  # the ratios' bases

    cost_lines, agree_lines = [], []
    for key in chosen:
        label, critic = cases[key]
        print(f"timing {label} ...", flush=True)
        med = bench_cost(critic, batch, reps, warmup, block, names)
        for v, t in med.items():
            cost_lines.append(f"| {label} | {v} | {t * 1e3:.1f} | {t / med['plain']:.2f} | {t / med['exact-r1']:.2f} |")
        print(f"gradient agreement {label} ...", flush=True)
        for draws, mean, lo, hi, ratio in bench_agreement(critic, batch, calls, (1, 4, 16)):
            agree_lines.append(f"| {label} | {draws} | {mean:.3f} | {lo:.3f} – {hi:.3f} | {ratio:.2f} |")

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"Measured on {machine}; torch {torch.__version__}, gradpen {gradpen.__version__}; "
        f"median of {reps} interleaved repetitions of {block} critic updates each, after {warmup} warm-up"
        f"{' (--quick: tiny models, not representative)' if args.quick else ''}.",
        "",
        "| critic | variant | ms / update | × plain | × exact-r1 |",
        "|---|---|---:|---:|---:|",
        *cost_lines,
        "",
        f"Parameter-gradient agreement with r1_penalty (sigma {SIGMA}, forward scheme), {calls} calls per row:",
        "",
        "| critic | draws | mean cosine | min – max | mean norm ratio |",
        "|---|---:|---:|---:|---:|",
        *agree_lines,
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out or Path(__file__).parent / "results_approx_cpu.md")
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
