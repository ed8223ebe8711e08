"""What the SDPA MATH kernel costs a transformer critic, against fd and the estimators on the default kernel.

    python benchmarks/bench_attention.py             # CPU
    python benchmarks/bench_attention.py --quick     # tiny sizes, few reps: checks that it runs
    python benchmarks/bench_attention.py --threads 1 # one thread: steadier on a shared machine

An exact penalty differentiates the critic twice, and only the MATH kernel of
``scaled_dot_product_attention`` has a double backward, so gradpen runs the penalty's critic forward
under ``sdpa_kernel(SDPBackend.MATH)``; the WGAN loss terms keep the default kernel. Table 1 times one
critic update of a small transformer critic (2 encoder layers with GELU, width 64, 4 heads, batch 16,
sequence length L) for:

    floor          WGAN loss, no penalty, default kernel choice
    floor, MATH    the same step with the MATH kernel forced: the kernel's own cost
    exact GP       WGAN loss + 10 * gradpen.gradient_penalty (its forward on MATH)
    fd GP          WGAN loss + 10 * gradpen.gradient_penalty(backend="fd") (default kernel, no double backward)
    approx GP      WGAN loss + 10 * gradpen.approx_gradient_penalty (default kernel; zero-centred, estimated)

The fixed per-call cost of gradpen's checks is measured by benchmarks/bench_overhead.py.

Method: interleaved, shuffled blocks; medians over repetitions; ratios of medians (benchmarks/_timing.py).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradpen

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, time_variants

LAMBDA = 10.0  # the paper's penalty weight
GUARDS = ("check_exact_critic", "math_attention", "check_graph", "probe_graph", "func_limits")


class TransformerCritic(nn.Module):
    """Tokens (N, L, E) -> two pre-norm encoder layers -> mean over tokens -> one score per sample."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )  # GELU, not the default ReLU: smooth, so backend="fd" applies
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


def attention_table(lengths, width, batch, reps, warmup, block):
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        critic = TransformerCritic(width, heads=4, layers=2)
        gp = lambda c, r, f: wgan(c, r, f) + LAMBDA * gradpen.gradient_penalty(c, r, f)
        variants = {"floor": wgan, "floor, MATH": math_only(wgan), "exact GP": gp}
        variants["fd GP"] = lambda c, r, f: wgan(c, r, f) + LAMBDA * gradpen.gradient_penalty(c, r, f, backend="fd")
        variants["approx GP"] = lambda c, r, f: wgan(c, r, f) + LAMBDA * gradpen.approx_gradient_penalty(c, r, f)
        variants = {v: (copy.deepcopy(critic), fn) for v, fn in variants.items()}
        data = (torch.randn(batch, length, width), torch.randn(batch, length, width))
        print(f"timing L={length} ...", flush=True)
        med, _ = time_variants(variants, data, torch.device("cpu"), reps, warmup, block)
        for v in variants:
            rows.append((length, v, med[v] * 1e3, med[v] / med["floor"]))
    return rows


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
    lines = [
        f"Measured on {machine(torch.device('cpu'))}; torch {torch.__version__}, gradpen {gradpen.__version__}; "
        f"median of {reps} interleaved repetitions after {warmup} warm-up"
        f"{' (--quick: tiny sizes, not representative)' if args.quick else ''}.",
        "",
        f"Transformer critic: 2 encoder layers (GELU), width {width}, 4 heads, batch {batch}; {block} updates per "
        "block.",
        "",
        "| L | variant | ms / update | × floor |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {length} | {v} | {ms:.2f} | {r:.2f} |" for length, v, ms, r in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
