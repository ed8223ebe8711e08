"""What the SDPA MATH kernel costs a transformer critic, and what gradpen's guards cost per call.

    python benchmarks/bench_attention.py             # CPU
    python benchmarks/bench_attention.py --quick     # tiny sizes, few reps: checks that it runs
    python benchmarks/bench_attention.py --threads 1 # one thread: steadier on a shared machine

An exact penalty differentiates the critic twice, and only the MATH kernel of
``scaled_dot_product_attention`` has a double backward, so gradpen runs the penalty's critic forward
under ``sdpa_kernel(SDPBackend.MATH)``; the WGAN loss terms keep the default kernel. Table 1 times one
critic update of a small transformer critic (2 encoder layers, width 64, 4 heads, batch 16, sequence
length L) for:

    floor          WGAN loss, no penalty, default kernel choice
    floor, MATH    the same step with the MATH kernel forced: the kernel's own cost
    exact GP       WGAN loss + 10 * gradpen.gradient_penalty (its forward on MATH)
    approx GP      WGAN loss + 10 * gradpen.approx_gradient_penalty (default kernel), where it exists

Table 2 times gradpen.gradient_penalty alone on a small MLP (where fixed costs weigh most) with
gradpen's guards (FSDP/DDP check, the MATH context, the once-per-critic graph check) and with them
replaced by no-ops; and the one-time graph walk on the transformer critic.

Method: interleaved, shuffled blocks; medians over repetitions; ratios of medians (benchmarks/_timing.py).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradpen
from gradpen import _backends, _guards

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, time_variants

LAMBDA = 10.0  # the paper's penalty weight
GUARDS = ("check_exact_critic", "math_attention", "check_graph", "probe_graph", "func_limits")


class TransformerCritic(nn.Module):
    """Tokens (N, L, E) -> two pre-norm encoder layers -> mean over tokens -> one score per sample."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.body(x).mean(1)).squeeze(1)


def wgan(c, real, fake):
    return c(fake).mean() - c(real).mean()


def math_only(fn):
    def run(c, real, fake):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(c, real, fake)

    return run


@contextlib.contextmanager
def guards_off():
    """gradpen's backends with the guards replaced by no-ops (restored on exit)."""
    saved = {name: getattr(_backends, name) for name in GUARDS}
    for name in ("check_exact_critic", "check_graph", "probe_graph"):
        setattr(_backends, name, lambda *a, **k: None)
    for name in ("math_attention", "func_limits"):
        setattr(_backends, name, contextlib.nullcontext)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(_backends, name, fn)


def attention_table(lengths, width, batch, reps, warmup, block):
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        critic = TransformerCritic(width, heads=4, layers=2)
        gp = lambda c, r, f: wgan(c, r, f) + LAMBDA * gradpen.gradient_penalty(c, r, f)
        variants = {"floor": wgan, "floor, MATH": math_only(wgan), "exact GP": gp}
        if hasattr(gradpen, "approx_gradient_penalty"):
            variants["approx GP"] = lambda c, r, f: wgan(c, r, f) + LAMBDA * gradpen.approx_gradient_penalty(c, r, f)
        variants = {v: (copy.deepcopy(critic), fn) for v, fn in variants.items()}
        data = (torch.randn(batch, length, width), torch.randn(batch, length, width))
        print(f"timing L={length} ...", flush=True)
        med, _ = time_variants(variants, data, torch.device("cpu"), reps, warmup, block)
        for v in variants:
            rows.append((length, v, med[v] * 1e3, med[v] / med["floor"]))
    return rows


def guard_table(reps, warmup, block, length, width):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 64), nn.ELU(), nn.Linear(64, 64), nn.ELU(), nn.Linear(64, 1))
    data = (torch.randn(64, 8), torch.randn(64, 8))

    def penalty(backend, off):
        def run(c, r, f):
            with guards_off() if off else contextlib.nullcontext():
                return gradpen.gradient_penalty(c, r, f, backend=backend)

        return run

    variants = {
        f"{b}, guards {'off' if off else 'on'}": (copy.deepcopy(mlp), penalty(b, off))
        for b in ("autograd", "func")
        for off in (False, True)
    }
    print("timing the guards ...", flush=True)
    med, _ = time_variants(variants, data, torch.device("cpu"), reps, warmup, block)
    rows = [(v, med[v] * 1e6, med[v] / med[f"{v.split(',')[0]}, guards off"]) for v in variants]

    fixed = {"MLP": guard_us(mlp, reps), "transformer": guard_us(TransformerCritic(width, heads=4, layers=2), reps)}

    critic = TransformerCritic(width, heads=4, layers=2)
    x = torch.randn(16, length, width, requires_grad=True)
    walks, calls = [], []
    for _ in range(reps):
        with sdpa_kernel(SDPBackend.MATH):
            out = critic(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        t0 = time.perf_counter()
        _guards._graph_problem(out, [g])
        walks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gradpen.gradient_penalty(critic, x.detach(), x.detach()).backward()
        calls.append(time.perf_counter() - t0)
    return rows, fixed, statistics.median(walks) * 1e3, statistics.median(calls) * 1e3


def guard_us(critic, reps, loops=1000):
    """Median µs of the guards' per-call work once a critic is checked: the FSDP/DDP walk over its
    modules, the checked-critic look-up, and entering and leaving the MATH and func-error contexts."""
    _guards._mark_checked(critic)
    per = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(loops):
            _guards.check_exact_critic(critic)
            _guards.check_graph(critic, None, ())
            with _guards.math_attention(), _guards.func_limits():
                pass
        per.append((time.perf_counter() - t0) / loops)
    return statistics.median(per) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few reps: checks that it runs")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 7)
    warmup = 1 if args.quick else 2
    lengths, width, batch, block = ((8,), 16, 4, 2) if args.quick else ((16, 64, 256), 64, 16, 4)

    rows = attention_table(lengths, width, batch, reps, warmup, block)
    guard_rows, fixed, walk_ms, call_ms = guard_table(reps, warmup, 16, lengths[-1], width)
    lines = [
        f"Measured on {machine(torch.device('cpu'))}; torch {torch.__version__}, gradpen {gradpen.__version__}; "
        f"median of {reps} interleaved repetitions after {warmup} warm-up"
        f"{' (--quick: tiny sizes, not representative)' if args.quick else ''}.",
        "",
        f"Transformer critic: 2 encoder layers, width {width}, 4 heads, batch {batch}; {block} updates per block.",
        "",
        "| L | variant | ms / update | × floor |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {length} | {v} | {ms:.2f} | {r:.2f} |" for length, v, ms, r in rows]
    lines += [
        "",
        "gradpen.gradient_penalty + backward on an MLP 8-64-64-1, batch 64; 16 calls per block.",
        "",
        "| backend, guards | µs / call | × guards off |",
        "|---|---:|---:|",
    ]
    lines += [f"| {v} | {us:.0f} | {r:.3f} |" for v, us, r in guard_rows]
    lines += [
        "",
        "The guards' own work per call on a critic already checked (FSDP/DDP module walk, look-up, MATH and "
        f"func-error contexts; median of {reps} × 1000 loops): "
        + ", ".join(f"{us:.1f} µs ({name})" for name, us in fixed.items())
        + ".",
        "",
        f"One-time graph walk on the transformer critic (L={lengths[-1]}, batch 16): {walk_ms:.2f} ms, against "
        f"{call_ms:.1f} ms for one gradient_penalty + backward (medians of {reps}).",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
