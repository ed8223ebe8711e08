"""The fixed per-call cost of gradient_penalty on small critics: the checks, in microseconds, and the whole step.

    python benchmarks/bench_overhead.py               # CPU, 1 thread
    python benchmarks/bench_overhead.py --quick       # few reps: checks that it runs

Part 1 times each check of the per-call path on its own (median of many calls, in microseconds), on
the digits MLP critic (64-256-256-1, LeakyReLU) at batch 64: the module walk (FSDP, static-graph DDP,
BatchNorm), the look-ups of the once-per-critic checks (graph, batch coupling), the SDPA kernel
context, critic_args resolution and the norm; then the whole call's forward half against the
recipe's, interleaved (the checks together and in place, where each costs more than alone). Run it
against another checkout of gradpen with
``PYTHONPATH=/path/to/checkout python benchmarks/bench_overhead.py --part checks``: the script uses what
that version has (names that do not exist there are skipped).

Part 2 times one critic update (WGAN loss + 10 * penalty, backward, Adam step) with
gradpen.gradient_penalty (autograd and func backends) against the hand-written recipe
(PyTorch-GAN's compute_gradient_penalty) and the same recipe on torch.func (``vmap(grad(...))``), on
the digits MLP at batch 64, the toy MLP 2-512x3-1 at batch 256 and the trainer's DCGAN critic (dim 64,
batch 64, 3x32x32). Interleaved, shuffled blocks; medians; ratios of medians (_timing.py). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gradpen
from gradpen import _backends, _guards, _penalty

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models
from _timing import machine, time_variants

LAMBDA = 10.0


def recipe_gradient_penalty(critic, real, fake):
    """The hand-written recipe (PyTorch-GAN's compute_gradient_penalty), the baseline."""
    alpha = torch.rand(real.size(0), *([1] * (real.ndim - 1)), device=real.device)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    d = critic(interpolates)
    (grad,) = torch.autograd.grad(d, interpolates, torch.ones_like(d), create_graph=True, retain_graph=True)
    return ((grad.view(grad.size(0), -1).norm(2, dim=1) - 1) ** 2).mean()


def func_recipe_gradient_penalty(critic, real, fake):
    """The same recipe with torch.func's per-sample gradient, ``vmap(grad(...))``, instead of autograd.grad:
    what a hand-written func penalty costs, for gradpen's func backend to be compared with."""
    alpha = torch.rand(real.size(0), *([1] * (real.ndim - 1)), device=real.device)
    interpolates = alpha * real + (1 - alpha) * fake
    one = lambda x: critic(x[None]).sum()
    grad = torch.func.vmap(torch.func.grad(one), randomness="different")(interpolates)
    return ((grad.view(grad.size(0), -1).norm(2, dim=1) - 1) ** 2).mean()


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def checks(calls: int) -> list[str]:
    """Each check of the per-call path on its own, with what this version of gradpen has."""
    torch.manual_seed(0)
    critic = models.MLPCritic(64, 8, 1)
    x = torch.randn(64, 1, 8, 8)
    gradpen.gradient_penalty(critic, x, x)  # the once-per-critic checks have run
    grads = torch.randn(64, 64)
    out = critic(x.requires_grad_(True))
    found = {
        "module walk: FSDP / static DDP": lambda: _guards.check_exact_critic(critic),
        "module walk: BatchNorm": lambda: _guards.batch_coupled_modules(critic),
        "graph check, later calls": (
            (lambda: _guards.graph_checked(critic))
            if hasattr(_guards, "graph_checked")
            else (lambda: _guards._is_checked(critic))
        ),
        "SDPA MATH context (enter and exit)": lambda: _enter_exit(_guards.math_attention()),
        "critic_args resolution (none given)": lambda: _penalty.resolve_critic_args((), None, 64),
        "backend look-up": (
            (lambda: _backends.resolve_backend("autograd"))
            if hasattr(_backends, "resolve_backend")
            else (lambda: _penalty.check_choice("autograd", "backend", _backends.BACKENDS))
        ),
        "norm of (64, 64) gradients": lambda: _penalty._norm(grads, torch.float32),
        "plain torch norm, for scale": lambda: grads.norm(2, dim=1),
    }
    if hasattr(_guards, "Scan"):
        scan = _guards.Scan(critic)
        found["module walk: one scan for all module guards"] = lambda: _guards.Scan(critic)
        if hasattr(_guards, "_walk"):  # the scan reuses the last walk while the tree is unchanged
            found["module walk itself (a new or changed tree)"] = lambda: _guards._walk(critic, True)
        found["module walk: FSDP / static DDP"] = lambda: _guards.check_exact_critic(critic, scan)
        found["module walk: BatchNorm"] = lambda: _guards.batch_coupled_modules(critic, scan)
        found["SDPA context for a critic without attention"] = lambda: _enter_exit(_guards.attention_context(critic))
    if hasattr(_guards, "critic_key"):
        found["critic key (for the cached checks)"] = lambda: _guards.critic_key(critic)
    if hasattr(gradpen, "FiniteDifference"):
        from gradpen import _probes

        found["batch-coupling check, later calls"] = lambda: _probes.batch_coupled(critic, out, (x,))
    if hasattr(_backends, "_settled"):
        key = _guards.critic_key(critic)[0]
        found["all cached checks passed (one look-up)"] = lambda: _backends._settled.has(critic, key)
    rows = [f"gradpen {gradpen.__version__} from {Path(gradpen.__file__).parent}", "",
            "| check | µs per call |", "|---|---:|"]  # fmt: skip
    for name, fn in found.items():
        rows.append(f"| {name} | {per_call_us(fn, calls):.1f} |")
        print(rows[-1], flush=True)
    return rows


def whole_call(reps: int) -> list[str]:
    """The penalty's forward half (no backward) on the digits MLP at batch 64, interleaved with the
    recipe's: what a call costs beyond the recipe, all checks together and in place, where each costs
    more than on its own (the critic's forward has evicted it from the caches)."""
    torch.manual_seed(0)
    critic = models.MLPCritic(64, 8, 1)
    real, fake = torch.randn(64, 1, 8, 8), torch.randn(64, 1, 8, 8)
    variants = {
        "recipe": lambda: recipe_gradient_penalty(critic, real, fake),
        "autograd": lambda: gradpen.gradient_penalty(critic, real, fake),
        "func recipe": lambda: func_recipe_gradient_penalty(critic, real, fake),
        "func": lambda: gradpen.gradient_penalty(critic, real, fake, backend="func"),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for rep in range(reps + 3):
        random.Random(rep).shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            for _ in range(50):
                variants[v]()
            if rep >= 3:
                times[v].append((time.perf_counter() - t0) / 50 * 1e6)
    med = {v: statistics.median(t) for v, t in times.items()}
    return [
        "| the whole call, forward half (µs) | per call | beyond its recipe |",
        "|---|---:|---:|",
        f"| recipe | {med['recipe']:.1f} | |",
        f"| gradient_penalty, autograd | {med['autograd']:.1f} | {med['autograd'] - med['recipe']:.1f} |",
        f"| recipe on torch.func | {med['func recipe']:.1f} | |",
        f"| gradient_penalty, func | {med['func']:.1f} | {med['func'] - med['func recipe']:.1f} |",
    ]


def _enter_exit(cm):
    with cm:
        pass


def steps(reps: int, warmup: int, quick: bool) -> list[str]:
    toy = nn.Sequential(
        nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1)
    )  # fmt: skip
    # (label, critic, sample shape, batch, updates per block, repetitions as a multiple of reps): blocks of
    # 0.1-1.7 s, and more repetitions of the shorter ones, which are most at the mercy of the machine.
    cases = [
        ("digits MLP 64-256-256-1, batch 64", models.MLPCritic(64, 8, 1), (1, 8, 8), 64, 32, 8),
        ("toy MLP 2-512x3-1, batch 256", toy, (2,), 256, 8, 4),
    ]
    if not quick:
        cases.append(("DCGAN critic dim 64, batch 64", models.DCGANCritic(64), (3, 32, 32), 64, 4, 1))

    def wgan(c, real, fake):
        return c(fake).mean() - c(real).mean()

    variants = {
        "recipe": lambda c, r, f: wgan(c, r, f) + LAMBDA * recipe_gradient_penalty(c, r, f),
        "autograd": lambda c, r, f: wgan(c, r, f) + LAMBDA * gradpen.gradient_penalty(c, r, f),
        "func": lambda c, r, f: wgan(c, r, f) + LAMBDA * gradpen.gradient_penalty(c, r, f, backend="func"),
        "func recipe": lambda c, r, f: wgan(c, r, f) + LAMBDA * func_recipe_gradient_penalty(c, r, f),
    }
    rows = ["| critic | variant | ms / update | x recipe | x autograd |", "|---|---|---:|---:|---:|"]
    for label, critic, shape, batch, block, times in cases:
        torch.manual_seed(0)
        data = (torch.randn(batch, *shape), torch.randn(batch, *shape))
        runs = {v: (copy.deepcopy(critic), fn) for v, fn in variants.items()}
        med, _ = time_variants(runs, data, torch.device("cpu"), reps * times, warmup, block=block)
        for v in variants:
            rows.append(f"| {label} | {v} | {med[v] * 1e3:.3f} | {med[v] / med['recipe']:.3f} "
                        f"| {med[v] / med['autograd']:.3f} |")  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["checks", "steps", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="few reps, no DCGAN: checks that it runs")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 15; 8x digits MLP, 4x toy MLP)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=None, help="Markdown output (default: benchmarks/results_overhead_cpu.md)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 15)
    text = [f"Measured on {machine(torch.device('cpu'))}; torch {torch.__version__}, gradpen {gradpen.__version__}"
            f"{' (--quick, not representative)' if args.quick else ''}.", ""]  # fmt: skip
    if args.part in ("checks", "all"):
        text += [*checks(200 if args.quick else 5000), ""]
        whole = whole_call(2 if args.quick else 60)
        print("\n".join(whole), flush=True)
        text += [*whole, ""]
    if args.part in ("steps", "all"):
        text += [*steps(reps, 1 if args.quick else 3, args.quick), ""]
    out = Path(args.out or Path(__file__).parent / "results_overhead_cpu.md")
    out.write_text("\n".join(text))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
