"""backend="fd": how close its parameter gradient is to the exact one, what it costs, and what memory it needs.

    python benchmarks/bench_fd.py --part accuracy    # the accuracy table (fd and approx_* vs exact float64)
    python benchmarks/bench_fd.py --part cost        # ViT critic L = 16/64/256 and DCGAN-SiLU, 1 thread
    python benchmarks/bench_fd.py --part memory      # peak memory of the R1 steps, ViT L = 256 and 1024
    python benchmarks/bench_fd.py --quick            # every part at toy sizes: checks that it runs

Accuracy. For each critic (an MLP with SiLU, a DCGAN-shaped conv net with SiLU, a ViT with LayerNorm, GELU
and SDPA; a LeakyReLU MLP as the kinked case), dtype (float32, float64, bf16 autocast) and penalty
(WGAN-GP, one-sided LP, R1, WGAN-div), the relative error ||g - g*|| / ||g*|| of the parameter gradient
g of the penalty against g*, the exact penalty's gradient in float64 at the same points: for the exact
backend itself (its rounding), for fd, and for approx_* (zero-centred penalties only) at equal cost
(``draws=2``: three forwards, as fd's central scheme), with its cosine to g*.

Cost. One R1 critic step (logistic loss + gamma/2 * R1, backward) of a transformer critic on token
inputs (width 64, 4 heads, 3 pre-norm blocks, batch 16) at sequence lengths L, and of a DCGAN-shaped critic
with SiLU (dim 64, batch 64, 3x32x32), in four forms: exact R1 on the MATH kernel (the only one with a
double backward) and fd on the default kernel, each as a separate penalty call and from the loss's own
forward (gradient_norms_from). Interleaved, shuffled blocks; medians; ratios of medians (_timing.py).

Memory. Peak memory of tensors created during one such step, from torch.profiler's memory timeline
(profile_memory=True), the CPU allocator's view: what the step itself allocates, the figure that carries
over to a GPU (activations and graphs, not the allocator's caching).

Nothing is asserted: this prints and writes Markdown, one file per part (benchmarks/results_fd_<part>.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradpen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models
from _timing import machine

GAMMA = 10.0  # R1 weight gamma; the step adds gamma / 2 * R1 (Mescheder et al.)


class TokenViT(nn.Module):
    """Tokens (N, L, E) -> linear embedding + learnt positions -> pre-norm blocks (the trainer's) -> LN -> mean."""

    def __init__(self, length: int, e: int = 16, width: int = 64, heads: int = 4, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(e, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, width))
        self.blocks = nn.Sequential(*[models.Block(width, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos)).mean(1)).sum(1)


def dcgan_silu(dim: int, channels: int = 3) -> nn.Module:
    """The trainer's DCGAN critic (5x5 stride-2 convs) with SiLU in place of LeakyReLU: smooth."""
    critic = models.DCGANCritic(dim, 32, channels)
    for i, layer in enumerate(critic.body):
        if isinstance(layer, nn.LeakyReLU):
            critic.body[i] = nn.SiLU()
    return critic


def mlp(act: type[nn.Module], d: int = 64, width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 1))


# --------------------------------------------------------------------------- accuracy


# name -> penalty(critic, real, fake, alpha, backend, lp_center)
PENALTIES = {
    "WGAN-GP": lambda c, r, f, a, b, lp: gradpen.gradient_penalty(c, r, f, alpha=a, backend=b),
    # one-sided, with the center at the median norm of the interpolates: active for half of the samples
    "LP": lambda c, r, f, a, b, lp: gradpen.gradient_penalty(c, r, f, lp, True, alpha=a, backend=b),
    "R1": lambda c, r, f, a, b, lp: gradpen.r1_penalty(c, r, backend=b),
    "WGAN-div": lambda c, r, f, a, b, lp: gradpen.wgan_div_penalty(c, r, f, backend=b),
}


def _center(critic, real, fake, alpha):
    x = gradpen.interpolate(real, fake, alpha=alpha)
    return float(gradpen.gradient_norms(critic, x, create_graph=False).median())


def _grad(critic, loss):
    params = [p for p in critic.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for g, p in zip(grads, params, strict=False)]
    )


def _rel(g, ref):
    return ((g - ref).norm() / ref.norm()).item()


def _cos(g, ref):
    return (torch.dot(g, ref) / (g.norm() * ref.norm())).item()


def accuracy(quick: bool) -> list[str]:
    torch.manual_seed(0)
    n = 8 if quick else 64
    cases = {
        "MLP-SiLU": (lambda: mlp(nn.SiLU, 16, 32) if quick else mlp(nn.SiLU), (16,) if quick else (64,)),
        "DCGAN-SiLU": (lambda: dcgan_silu(8 if quick else 32, 1), (1, 32, 32)),
        "ViT (LN, GELU, SDPA)": (lambda: TokenViT(16, width=16 if quick else 64), (16, 16)),
        "MLP-LeakyReLU (kinked)": (lambda: mlp(lambda: nn.LeakyReLU(0.2), 16, 32) if quick else mlp(
            lambda: nn.LeakyReLU(0.2)), (16,) if quick else (64,)),
    }  # fmt: skip
    fd_kinks = gradpen.FiniteDifference(allow_kinks=True)
    records = []
    for name, (make, shape) in cases.items():
        torch.manual_seed(1)
        base = make()
        real, fake, alpha = torch.randn(n, *shape), torch.randn(n, *shape), torch.rand(n)
        other = [t.double() for t in (torch.randn(n, *shape), torch.randn(n, *shape), torch.rand(n))]
        c64 = copy.deepcopy(base).double()
        lp = _center(c64, real.double(), fake.double(), alpha.double())
        for dtype in ("float32", "float64", "bf16"):
            critic = copy.deepcopy(base).double() if dtype == "float64" else copy.deepcopy(base)
            wide = torch.float64 if dtype == "float64" else torch.float32
            r, f, a = real.to(wide), fake.to(wide), alpha.to(wide)
            amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
            for pen, fn in PENALTIES.items():
                ref = _grad(c64, fn(c64, real.double(), fake.double(), alpha.double(), "autograd", lp))
                noise = _rel(_grad(c64, fn(c64, *other, "autograd", lp)), ref)  # the gradient of another batch
                fd_backend = fd_kinks if "kinked" in name else "fd"
                forward = gradpen.FiniteDifference(scheme="forward", allow_kinks="kinked" in name)
                with amp:
                    exact = _grad(critic, fn(critic, r, f, a, "autograd", lp))
                    fd = _grad(critic, fn(critic, r, f, a, fd_backend, lp))
                    fd_forward = _grad(critic, fn(critic, r, f, a, forward, lp))
                cosine = None
                if pen == "R1":
                    sigma = 0.5 if dtype == "bf16" else 0.01  # bf16: sigma above its resolution at unit scale
                    with amp:
                        g = _grad(critic, gradpen.approx_r1_penalty(critic, r, sigma=sigma, draws=2))
                    cosine = _cos(g, ref)
                records.append({"critic": name, "dtype": dtype, "penalty": pen, "exact": _rel(exact, ref),
                                "fd": _rel(fd, ref), "forward": _rel(fd_forward, ref), "approx_cos": cosine,
                                "batch": noise})  # fmt: skip
                print(records[-1], flush=True)
    return format_accuracy(records)


def format_accuracy(records: list[dict]) -> list[str]:
    """One table per critic (a heading each): relative errors of the parameter gradient against float64."""
    rows = []
    for name in dict.fromkeys(r["critic"] for r in records):
        rows += [f"### {name}", "", "| penalty, dtype | exact | fd | fd, forward | approx cos | other batch |",
                 "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in (r for r in records if r["critic"] == name):
            cos = "" if r["approx_cos"] is None else f"{r['approx_cos']:.2f}"
            e = {k: "0" if r[k] == 0 else f"{r[k]:.0e}" for k in ("exact", "fd", "forward")}
            rows.append(f"| {r['penalty']}, {r['dtype']} | {e['exact']} | {e['fd']} | {e['forward']} | {cos} "
                        f"| {r['batch']:.2f} |")  # fmt: skip
        rows.append("")
    return rows


# --------------------------------------------------------------------------- cost and memory


def r1_steps(critic: nn.Module):
    """name -> step(critic, real) returning the critic loss (logistic + gamma/2 R1) to backpropagate."""

    def separate(backend):
        def step(c, real):
            loss = F.softplus(-c(real)).mean()
            if backend == "autograd":
                with sdpa_kernel(SDPBackend.MATH):  # gradpen does this itself; explicit for the reader
                    r1 = gradpen.r1_penalty(c, real)
            else:
                r1 = gradpen.r1_penalty(c, real, backend="fd")
            return loss + GAMMA / 2 * r1

        return step

    def shared(backend):
        def step(c, real):
            x = real.detach().requires_grad_(True)
            if backend == "autograd":
                with sdpa_kernel(SDPBackend.MATH):  # the loss's forward is differentiated twice: MATH
                    out = c(x)
                norms = gradpen.gradient_norms_from(out, x)
            else:
                out = c(x)  # default kernels
                norms = gradpen.gradient_norms_from(out, x, critic=c, backend="fd")
            return F.softplus(-out).mean() + GAMMA / 2 * norms.square().mean()

        return step

    def plain(c, real):
        return F.softplus(-c(real)).mean()

    return {
        "plain step": plain,
        "exact, separate": separate("autograd"),
        "fd, separate": separate("fd"),
        "exact, loss's forward": shared("autograd"),
        "fd, loss's forward": shared("fd"),
    }


def time_steps(critic, real, reps, warmup, block):
    steps = r1_steps(critic)
    copies = {k: copy.deepcopy(critic) for k in steps}
    opts = {k: torch.optim.Adam(c.parameters(), lr=1e-4, betas=(0.0, 0.9)) for k, c in copies.items()}
    times = {k: [] for k in steps}
    order = list(steps)
    import random

    for rep in range(warmup + reps):
        random.Random(rep).shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            for _ in range(block):
                opts[k].zero_grad(set_to_none=True)
                steps[k](copies[k], real).backward()
                opts[k].step()
            if rep >= warmup:
                times[k].append((time.perf_counter() - t0) / block)
    return {k: statistics.median(v) for k, v in times.items()}


def cost(quick: bool, reps: int) -> list[str]:
    torch.manual_seed(0)
    cases = [(f"ViT L={length}", TokenViT(length, width=16 if quick else 64), (16, length, 16))
             for length in ((16, 32) if quick else (16, 64, 256))]  # fmt: skip
    cases.append(("DCGAN-SiLU dim 64", dcgan_silu(8 if quick else 64), (8 if quick else 64, 3, 32, 32)))
    rows = [
        "| critic | step | ms / step | x plain | fd / exact |",
        "|---|---|---:|---:|---:|",
    ]
    for label, critic, shape in cases:
        real = torch.randn(*shape)
        med = time_steps(critic, real, reps, warmup=1 if quick else 2, block=2 if quick else 4)
        for k, v in med.items():
            other = {"fd, separate": "exact, separate", "fd, loss's forward": "exact, loss's forward"}.get(k)
            ratio = f"{v / med[other]:.2f}" if other else ""
            rows.append(f"| {label} | {k} | {v * 1e3:.1f} | {v / med['plain step']:.2f} | {ratio} |")
            print(rows[-1], flush=True)
    return rows


def peak_mib(fn) -> float:
    """Peak MiB of the tensors created while ``fn()`` runs, from torch.profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak / 2**20


def memory(quick: bool) -> list[str]:
    rows = ["| critic | step | peak MiB | fd / exact |", "|---|---|---:|---:|"]
    for length in (32, 64) if quick else (256, 1024):
        torch.manual_seed(0)
        critic = TokenViT(length, width=16 if quick else 64)
        real = torch.randn(4 if quick else 8, length, 16)
        steps = r1_steps(critic)
        peaks = {}
        for k, step in steps.items():
            step(critic, real).backward()  # warm-up (lazy state, the probes' first call)
            critic.zero_grad(set_to_none=True)
            peaks[k] = peak_mib(lambda step=step, critic=critic, real=real: step(critic, real).backward())
            critic.zero_grad(set_to_none=True)
        for k, v in peaks.items():
            other = {"fd, separate": "exact, separate", "fd, loss's forward": "exact, loss's forward"}.get(k)
            ratio = f"{v / peaks[other]:.2f}" if other else ""
            rows.append(f"| ViT L={length}, batch {real.shape[0]} | {k} | {v:.0f} | {ratio} |")
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["accuracy", "cost", "memory", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="toy sizes, few reps: checks that it runs")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions of the cost part (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    p.add_argument("--out-dir", default=None, help="where results_fd_<part>.md go (default: benchmarks/)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 7)
    parts = ["accuracy", "cost", "memory"] if args.part == "all" else [args.part]
    head = (f"Measured on {machine(torch.device('cpu'))}; torch {torch.__version__}, gradpen {gradpen.__version__}"
            f"{' (--quick: toy sizes, not representative)' if args.quick else ''}.")  # fmt: skip
    out_dir = Path(args.out_dir or Path(__file__).parent)
    for part in parts:
        print(f"--- {part}", flush=True)
        rows = accuracy(args.quick) if part == "accuracy" else cost(args.quick, reps) if part == "cost" else memory(
            args.quick)  # fmt: skip
        out = out_dir / f"results_fd_{part}.md"
        out.write_text("\n".join([head, "", *rows, ""]))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
