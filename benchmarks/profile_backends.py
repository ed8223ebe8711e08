"""Where the time of one critic update goes, per backend: torch.profiler's top operators.

    python benchmarks/profile_backends.py [--critic dcgan|resnet|mlp] [--device cpu|cuda] [--rows 12]

Used to explain the gap between ``backend="func"`` and ``backend="autograd"`` in eager mode: the
same arithmetic runs in both, but vmap's batching rules route the double backward of conv and
linear layers through different (batched or reshaped) kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import gradpen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--critic", choices=["mlp", "dcgan", "resnet"], default="dcgan")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=64, help="width of the image critics")
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.critic == "mlp":
        critic = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                               nn.ReLU(), nn.Linear(512, 1))  # fmt: skip
        shape, batch = (2,), 256
    else:
        critic = (models.DCGANCritic if args.critic == "dcgan" else models.ResNetCritic)(args.dim)
        shape, batch = (3, 32, 32), 64
    critic = critic.to(device)
    real, fake = torch.randn(batch, *shape, device=device), torch.randn(batch, *shape, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for backend in ("autograd", "func"):

        def step(backend=backend):
            critic.zero_grad(set_to_none=True)
            gp = gradpen.gradient_penalty(critic, real, fake, backend=backend)
            (critic(fake).mean() - critic(real).mean() + 10 * gp).backward()

        for _ in range(3):
            step()
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in prof.key_averages()) / 5 / 1e3
        print(f"\n=== backend={backend}: {total:.1f} ms of self time per update ({args.critic}, {device})")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
