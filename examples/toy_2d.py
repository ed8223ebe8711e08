"""The WGAN-GP paper's toy experiments (Gulrajani et al. 2017, Figure 1) with gradpen, measured.

    python examples/toy_2d.py --dataset 8gaussians,25gaussians --penalty gp,clip --iters 3000 --out runs/toy
    python examples/toy_2d.py --figure gradnorms --out runs/toy       # Figure 1b: deep critics, Swiss roll
    python examples/toy_2d.py --dataset swissroll --penalty gp,lp,zc,r1,dragan,clip,none --iters 2000
    python examples/toy_2d.py --dataset 8gaussians,25gaussians --penalty r1,approx-r1,zc,approx-zc --iters 500
    python examples/toy_2d.py --dataset 8gaussians,25gaussians --penalty gp,r1 --activation silu --backend fd

Datasets and setup follow the official ``gan_toy.py``: ReLU MLPs with 3 hidden layers of 512 and He
init, Adam 1e-4 with betas (0.5, 0.9), 5 critic steps per generator step, batch 256, lambda 0.1; the
``clip`` baseline is weight clipping at 0.01 with RMSProp 5e-5, ``none`` has no Lipschitz constraint.
``approx-r1`` and ``approx-zc`` are the double-backward-free twins of ``r1`` and ``zc``
(:func:`gradpen.approx_r1_penalty`, :func:`gradpen.approx_gradient_penalty`; sigma 0.01, one draw): the
same quantity, so the same loss and the same weight.
lambda 0.1 is gan_toy.py's value, not the paper's: the paper uses lambda 10 for all its experiments, and
``--figure gradnorms`` (a critic alone, Figure 1b) uses 10.
``--backend fd`` computes the exact penalties with first-order passes only (gradpen's finite-difference
backend), which needs a smooth critic: ``--activation silu`` replaces the ReLUs of both networks (gradpen
refuses fd on the ReLU critic, in one line, at the first step).

Writes ``toy_<datasets>.png`` (critic value as filled contours, real samples orange, generated green)
and ``toy_metrics.json``: modes covered and high-quality samples for the Gaussian mixtures
(a sample is high-quality within 3 std of its nearest mode; a mode is covered when a high-quality
sample is nearest to it) and the exact W1 distance between 1000 generated and 1000 real points,
beside the real-vs-real floor at the same n.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import gradpen

DATASETS = ["8gaussians", "25gaussians", "swissroll"]
PENALTIES = ["gp", "lp", "zc", "r1", "dragan", "approx-r1", "approx-zc", "clip", "none"]
DIM = 512  # hidden width (gan_toy.py DIM)
BATCH = 256  # gan_toy.py BATCH_SIZE
N_CRITIC = 5  # critic steps per generator step (gan_toy.py CRITIC_ITERS)
# gan_toy.py LAMBDA = .1: "Smaller lambda makes things faster for toy tasks, but isn't necessary if you
# increase CRITIC_ITERS enough"
GP_WEIGHT = 0.1
PAPER_GP_WEIGHT = 10.0  # the paper's lambda, used for all its experiments; here for --figure gradnorms
CLIP = 0.01  # WGAN weight clipping bound (gan_toy.py)


# ----------------------------------------------------------------------------- data (as in gan_toy.py)


def modes(name: str) -> tuple[np.ndarray, float]:
    """The mixture's centres and per-coordinate std, after gan_toy.py's scaling."""
    if name == "8gaussians":
        s = 1 / math.sqrt(2)
        c = 2.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
        return c / 1.414, 0.02 / 1.414
    if name == "25gaussians":
        c = np.array([(2.0 * x, 2.0 * y) for x in range(-2, 3) for y in range(-2, 3)])
        return c / 2.828, 0.05 / 2.828
    raise ValueError(f"{name} has no modes")


def sample(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if name == "swissroll":
        from sklearn.datasets import make_swiss_roll

        x = make_swiss_roll(n_samples=n, noise=0.25, random_state=int(rng.integers(2**31)))[0]
        return (x[:, [0, 2]] / 7.5).astype(np.float32)
    centres, std = modes(name)
    pick = centres[rng.integers(len(centres), size=n)]
    return (pick + rng.normal(size=(n, 2)) * std).astype(np.float32)


# ----------------------------------------------------------------------------- models


ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}  # relu: gan_toy.py's; silu: smooth, for --backend fd


def relu_mlp(n_in: int, n_out: int, hidden: int = DIM, depth: int = 3, activation: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(hidden, n_out))
    for m in layers:
        if isinstance(m, nn.Linear):  # He init, zero biases (tflib 'he' initialisation)
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class Critic(nn.Module):
    def __init__(self, depth: int = 3, activation: str = "relu"):
        super().__init__()
        self.net = relu_mlp(2, 1, depth=depth, activation=activation)

    def forward(self, x):
        return self.net(x).squeeze(1)


def penalty_term(kind: str, critic, real, fake, backend: str) -> torch.Tensor:
    """The regulariser added to the critic loss, weighted by the toy lambda."""
    if kind == "gp":
        return GP_WEIGHT * gradpen.gradient_penalty(critic, real, fake, backend=backend)
    if kind == "lp":
        return GP_WEIGHT * gradpen.gradient_penalty(critic, real, fake, one_sided=True, backend=backend)
    if kind == "zc":
        return GP_WEIGHT * gradpen.gradient_penalty(critic, real, fake, center=0.0, backend=backend)
    if kind == "r1":
        return GP_WEIGHT * gradpen.r1_penalty(critic, real, backend=backend)
    if kind == "dragan":
        return GP_WEIGHT * gradpen.dragan_penalty(critic, real, backend=backend)
    if kind == "approx-r1":  # no backend: finite differences, no input gradient
        return GP_WEIGHT * gradpen.approx_r1_penalty(critic, real)
    if kind == "approx-zc":
        return GP_WEIGHT * gradpen.approx_gradient_penalty(critic, real, fake)
    return real.new_zeros(())  # clip, none


def train(dataset: str, kind: str, iters: int, seed: int, backend: str, log_every: int = 500, activation: str = "relu"):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen, critic = relu_mlp(2, 2, activation=activation), Critic(activation=activation)
    if kind == "clip":
        opt_g = torch.optim.RMSprop(gen.parameters(), lr=5e-5)
        opt_d = torch.optim.RMSprop(critic.parameters(), lr=5e-5)
    else:
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.5, 0.9))
    t0 = time.perf_counter()
    for it in range(1, iters + 1):
        for _ in range(N_CRITIC):
            real = torch.from_numpy(sample(dataset, BATCH, rng))
            with torch.no_grad():
                fake = gen(torch.randn(BATCH, 2))
            loss_d = critic(fake).mean() - critic(real).mean() + penalty_term(kind, critic, real, fake, backend)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            if kind == "clip":
                with torch.no_grad():
                    for p in critic.parameters():
                        p.clamp_(-CLIP, CLIP)
        loss_g = -critic(gen(torch.randn(BATCH, 2))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if it % log_every == 0 or it == iters:
            print(f"  {dataset} {kind} iter {it} | D {loss_d.item():.4f} | G {loss_g.item():.4f}", flush=True)
    return gen, critic, time.perf_counter() - t0


# ----------------------------------------------------------------------------- metrics


def mode_metrics(points: np.ndarray, centres: np.ndarray, std: float) -> dict[str, float]:
    """High-quality share (within 3 std of the nearest mode) and the number of modes covered."""
    dist = np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=2)
    nearest, d = dist.argmin(1), dist.min(1)
    good = d <= 3 * std
    return {"high_quality": float(good.mean()), "modes_covered": len(np.unique(nearest[good])),
            "modes": len(centres)}  # fmt: skip


def w1(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W1 between two equal-size point sets: an optimal assignment on Euclidean distances."""
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def evaluate(dataset: str, gen: nn.Module, seed: int, n: int = 1000) -> dict[str, float]:
    rng = np.random.default_rng(seed + 12345)
    with torch.no_grad():
        fake = gen(torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 1))).numpy()
    real_a, real_b = sample(dataset, n, rng), sample(dataset, n, rng)
    out = {"w1": w1(fake, real_a), "w1_floor": w1(real_a, real_b)}
    if dataset != "swissroll":
        out.update(mode_metrics(fake, *modes(dataset)))
    return out


# ----------------------------------------------------------------------------- figures


def plot_panels(results, out: Path, datasets, kinds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(datasets), len(kinds), figsize=(3.2 * len(kinds), 3.2 * len(datasets)), squeeze=False)
    lim, n_grid = 2.0, 128
    xs = np.linspace(-lim, lim, n_grid, dtype=np.float32)
    grid = torch.from_numpy(np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2))
    for i, ds in enumerate(datasets):
        real = sample(ds, 512, np.random.default_rng(0))
        for j, kind in enumerate(kinds):
            gen, critic, metrics = results[(ds, kind)]
            with torch.no_grad():
                value = critic(grid).reshape(n_grid, n_grid).numpy()
                fake = gen(torch.randn(512, 2, generator=torch.Generator().manual_seed(0))).numpy()
            ax = axes[i][j]
            ax.contourf(xs, xs, value, levels=20, cmap="viridis")
            ax.scatter(real[:, 0], real[:, 1], s=3, c="orange", label="real")
            ax.scatter(fake[:, 0], fake[:, 1], s=3, c="lime", label="generated")
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
            title = f"{ds} · {kind}\nW1 {metrics['w1']:.3f} (floor {metrics['w1_floor']:.3f})"
            if "modes" in metrics:
                title += (
                    f"\n{metrics['modes_covered']}/{metrics['modes']} modes, {100 * metrics['high_quality']:.0f}% HQ"
                )
            ax.set_title(title, fontsize=8)
    axes[0][0].legend(loc="lower left", fontsize=6, markerscale=3)
    fig.tight_layout()
    path = out / f"toy_{'_'.join(datasets)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def activation_grad_norms(critic: Critic, real: torch.Tensor, fake: torch.Tensor) -> list[float]:
    """Norm of the WGAN critic loss's gradient w.r.t. each hidden layer's activations (ReLU outputs).

    The loss is ``D(fake).mean() - D(real).mean()`` on one batch of real and fake points; the norm is taken
    over the whole ``(2N, width)`` activation tensor of each layer, first hidden layer first.
    """
    h, acts = torch.cat([real, fake]), []
    for m in critic.net:
        h = m(h)
        if isinstance(m, tuple(ACTIVATIONS.values())):
            acts.append(h)
    n = len(real)
    loss = h[n:].mean() - h[:n].mean()
    return [g.norm().item() for g in torch.autograd.grad(loss, acts)]


def figure_gradnorms(out: Path, seed: int, steps: int, backend: str):
    """Figure 1b: gradient norms w.r.t. each layer's activations in a deep ReLU critic, clipping vs GP.

    As in the paper, the critic has 12 hidden ReLU layers (then a linear output) and is trained on the Swiss
    roll against a fixed generator (real data plus unit Gaussian noise, gan_toy.py's FIXED_GENERATOR), with
    the paper's lambda = 10 for GP; after training, the norm of the critic loss's gradient w.r.t. each hidden
    layer's activations is measured on a fresh batch (``activation_grad_norms``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = 12  # hidden ReLU layers of the deep critic: one point per layer in the figure
    settings = [("clip", 0.1), ("clip", 0.01), ("clip", 0.001), ("gp", None)]
    curves = {}
    for kind, c in settings:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        critic = Critic(depth=depth)
        if kind == "clip":
            opt = torch.optim.RMSprop(critic.parameters(), lr=5e-5)
        else:
            opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.5, 0.9))
        for _ in range(steps):
            real = torch.from_numpy(sample("swissroll", BATCH, rng))
            fake = real + torch.randn_like(real)  # gan_toy.py FIXED_GENERATOR
            loss = critic(fake).mean() - critic(real).mean()
            if kind == "gp":
                loss = loss + PAPER_GP_WEIGHT * gradpen.gradient_penalty(critic, real, fake, backend=backend)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if kind == "clip":
                with torch.no_grad():
                    for p in critic.parameters():
                        p.clamp_(-c, c)
        real = torch.from_numpy(sample("swissroll", BATCH, rng))
        norms = activation_grad_norms(critic, real, real + torch.randn_like(real))
        label = f"weight clipping c={c}" if kind == "clip" else "gradient penalty"
        curves[label] = norms
        print(f"  gradnorms {label}: layer 1 {norms[0]:.3g} ... layer {len(norms)} {norms[-1]:.3g}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, norms in curves.items():
        ax.plot(range(1, len(norms) + 1), np.log10(np.maximum(norms, 1e-30)), marker="o", ms=3, label=label)
    ax.set(
        xlabel="hidden layer",
        ylabel="log10 |d loss / d activations|",
        title=f"Swiss roll, critic with {depth} hidden ReLU layers, {steps} steps",
        xticks=range(1, depth + 1),
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "toy_gradnorms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    (out / "toy_gradnorms.json").write_text(json.dumps(curves, indent=1))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="toy_2d.py", description="WGAN-GP toy experiments (paper Figure 1).")
    p.add_argument("--dataset", default="8gaussians,25gaussians,swissroll", help=f"comma list of {DATASETS}")
    p.add_argument("--penalty", default="gp,clip", help=f"comma list of {PENALTIES}")
    p.add_argument("--backend", choices=["autograd", "func", "fd"], default="autograd", help="gradpen backend")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu",
                   help="of both networks: relu (gan_toy.py), or silu (smooth, for --backend fd)")  # fmt: skip
    p.add_argument("--iters", type=int, default=3000, help="generator steps per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--figure", choices=["panels", "gradnorms"], default="panels")
    p.add_argument("--gradnorm-steps", type=int, default=500, help="critic steps for --figure gradnorms")
    args = p.parse_args(argv)
    datasets, kinds = args.dataset.split(","), args.penalty.split(",")
    for d in datasets:
        if d not in DATASETS:
            p.error(f"--dataset: unknown {d!r}; expected a comma list of {DATASETS}")
    for k in kinds:
        if k not in PENALTIES:
            p.error(f"--penalty: unknown {k!r}; expected a comma list of {PENALTIES}")
    if args.iters < 1 or args.gradnorm_steps < 1:
        p.error("--iters and --gradnorm-steps must be >= 1")
    if args.backend == "fd" and args.activation == "relu" and set(kinds) & {"gp", "lp", "zc", "r1", "dragan"}:
        p.error("--backend fd needs a smooth critic (a ReLU critic's input gradient jumps): add --activation silu")
    if args.figure == "gradnorms" and args.activation != "relu":
        p.error("--figure gradnorms is the paper's ReLU critic: drop --activation")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.figure == "gradnorms":
        print(f"wrote {figure_gradnorms(out, args.seed, args.gradnorm_steps, args.backend)}")
        return

    results, table = {}, []
    for ds in datasets:
        for kind in kinds:
            gen, critic, seconds = train(ds, kind, args.iters, args.seed, args.backend, activation=args.activation)
            metrics = evaluate(ds, gen, args.seed)
            results[(ds, kind)] = (gen, critic, metrics)
            table.append({"dataset": ds, "penalty": kind, "backend": args.backend, "activation": args.activation,
                          "seed": args.seed, "iters": args.iters, "seconds": seconds, **metrics})  # fmt: skip
            print(json.dumps(table[-1]))
    (out / "toy_metrics.json").write_text(json.dumps(table, indent=1))
    print(f"wrote {plot_panels(results, out, datasets, kinds)} and {out / 'toy_metrics.json'}")
    print("\n| dataset | penalty | modes covered | high quality | W1 | W1 floor | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in table:
        modes_txt = f"{r['modes_covered']}/{r['modes']}" if "modes" in r else "-"
        hq = f"{100 * r['high_quality']:.1f}%" if "modes" in r else "-"
        w = f"{r['w1']:.4f} | {r['w1_floor']:.4f}"
        print(f"| {r['dataset']} | {r['penalty']} | {modes_txt} | {hq} | {w} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
