"""What a gradient penalty costs: one full critic update, timed against the hand-written recipe and the floor.

    python benchmarks/bench_penalty.py                  # CPU, the sizes of the issue
    python benchmarks/bench_penalty.py --device cuda    # on a GPU
    python benchmarks/bench_penalty.py --quick          # tiny models, a few reps: checks that it runs

For each critic (toy MLP 2-512x3-1 at batch 256; the trainer's DCGAN and ResNet critics at batch
64 x 3x32x32) it times one critic update, WGAN loss + 10 * penalty + backward + Adam step, for:

    floor          the plain WGAN critic step, no penalty
    recipe         the hand-written PyTorch-GAN ``compute_gradient_penalty``, kept below as the baseline
    autograd       gradpen.gradient_penalty(backend="autograd")
    func           gradpen.gradient_penalty(backend="func")
    func+compile   the whole loss under torch.compile, gradpen with backend="func"
    every=4/16     gradpen.GradientPenalty(every=k): lazy regularisation, amortised per step

Every repetition runs a block of 16 updates of each variant, in a shuffled order (interleaved), after
warm-up; the table gives the median time per update over repetitions and the ratios of medians.
Nothing here is asserted: this is a measurement, printed and written as Markdown.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

import gradpen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models
from _timing import machine, peak_mib, time_variants

LAMBDA = 10.0  # the paper's penalty weight
BLOCK = 16  # updates per timed block: a multiple of every=4 and every=16


def recipe_gradient_penalty(critic, real, fake):
    """The hand-written recipe as found in PyTorch-GAN's wgan_gp.py (``compute_gradient_penalty``)."""
    alpha = torch.rand(real.size(0), *([1] * (real.ndim - 1)), device=real.device)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    d_interpolates = critic(interpolates)
    grad_outputs = torch.ones_like(d_interpolates)
    gradients = torch.autograd.grad(
        outputs=d_interpolates, inputs=interpolates, grad_outputs=grad_outputs, create_graph=True, retain_graph=True
    )[0]
    gradients = gradients.view(gradients.size(0), -1)
    return ((gradients.norm(2, dim=1) - 1) ** 2).mean()


def make_variants(critic, compile_ok: bool):
    """name -> (critic copy, loss function(critic, real, fake) -> loss)."""

    def wgan(c, real, fake):
        return c(fake).mean() - c(real).mean()

    def with_penalty(penalty):
        return lambda c, real, fake: wgan(c, real, fake) + LAMBDA * penalty(c, real, fake)

    variants = {
        "floor": wgan,
        "recipe": with_penalty(recipe_gradient_penalty),
        "autograd": with_penalty(lambda c, r, f: gradpen.gradient_penalty(c, r, f)),
        "func": with_penalty(lambda c, r, f: gradpen.gradient_penalty(c, r, f, backend="func")),
    }
    if compile_ok:
        variants["func+compile"] = torch.compile(variants["func"])
    for k in (4, 16):
        lazy = gradpen.GradientPenalty(LAMBDA, every=k)
        variants[f"every={k}"] = lambda c, r, f, lazy=lazy: wgan(c, r, f) + lazy(c, r, f)
    return {name: (copy.deepcopy(critic), fn) for name, fn in variants.items()}


def bench(name, critic, shape, batch, device, reps, warmup, compile_ok):
    torch.manual_seed(0)
    critic = critic.to(device)
    data = (torch.randn(batch, *shape, device=device), torch.randn(batch, *shape, device=device))
    variants = make_variants(critic, compile_ok)
    med, peak = time_variants(variants, data, device, reps, warmup, BLOCK)
    return [(name, v, med[v] * 1e3, med[v] / med["recipe"], med[v] / med["floor"], peak_mib(peak, v)) for v in variants]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny models and few reps: checks that it runs")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; 2 with --quick)")
    parser.add_argument("--only", default=None, help="comma-separated subset of: mlp,dcgan,resnet")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default=None, help="Markdown output (default: benchmarks/results_<device>.md)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be >= 1")
    device = torch.device(args.device)
    reps = args.reps or (2 if args.quick else 7)
    warmup = 1 if args.quick else 2
    width, dim, batch_img = (16, 8, 8) if args.quick else (512, 128, 64)
    mlp = nn.Sequential(
        nn.Linear(2, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 1),
    )
    cases = {
        "mlp": (f"toy MLP 2-{width}x3-1, batch 256", mlp, (2,), 256),
        "dcgan": (f"DCGAN critic dim {dim}, batch {batch_img}", models.DCGANCritic(dim), (3, 32, 32), batch_img),
        "resnet": (f"ResNet critic dim {dim}, batch {batch_img}", models.ResNetCritic(dim), (3, 32, 32), batch_img),
    }
    chosen = args.only.split(",") if args.only else list(cases)
    for c in chosen:
        if c not in cases:
            parser.error(f"--only: unknown critic {c!r}; expected some of {sorted(cases)}")
    rows = []
    for key in chosen:
        label, critic, shape, batch = cases[key]
        print(f"benchmarking {label} on {device} ...", flush=True)
        rows += bench(label, critic, shape, batch, device, reps, warmup, not args.no_compile)

    lines = [
        f"Measured on {machine(device)}; torch {torch.__version__}, gradpen {gradpen.__version__}; "
        f"median of {reps} interleaved repetitions of {BLOCK} critic updates each, after {warmup} warm-up"
        f"{' (--quick: tiny models, not representative)' if args.quick else ''}.",
        "",
        "| critic | variant | ms / update | × recipe | × floor | peak MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {c} | {v} | {ms:.2f} | {r:.3f} | {f:.3f} | {m} |" for c, v, ms, r, f, m in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out or Path(__file__).parent / f"results_{device.type}.md")
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
