"""The one timing method of every benchmark here: interleaved, shuffled blocks; medians; ratios of medians.

Each repetition runs a block of ``block`` critic updates of every variant, in an order shuffled per
repetition (so slow drifts of a shared machine hit every variant alike), after ``warmup`` untimed
repetitions. Nothing is asserted: the scripts print and write Markdown.
"""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def time_variants(
    variants: dict[str, tuple[nn.Module, Loss]],
    data: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    reps: int,
    warmup: int,
    block: int,
) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds per update of each variant ``name -> (critic, loss_fn)``, and CUDA peak bytes.

    An update is ``zero_grad``, ``loss_fn(critic, real, fake).backward()``, an Adam step
    (lr 1e-4, betas (0, 0.9), the paper's).
    """
    opts = {v: torch.optim.Adam(c.parameters(), lr=1e-4, betas=(0.0, 0.9)) for v, (c, _) in variants.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    peak: dict[str, int] = {}
    real, fake = data
    order = list(variants)
    for rep in range(warmup + reps):
        random.Random(rep).shuffle(order)
        for v in order:
            critic, loss_fn = variants[v]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(block):
                opts[v].zero_grad(set_to_none=True)
                loss_fn(critic, real, fake).backward()
                opts[v].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= warmup:
                times[v].append((time.perf_counter() - t0) / block)
                if device.type == "cuda":
                    peak[v] = max(peak.get(v, 0), torch.cuda.max_memory_allocated(device))
    return {v: statistics.median(t) for v, t in times.items()}, peak


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def peak_mib(peak: dict[str, int], variant: str) -> str:
    return f"{peak[variant] / 2**20:.0f}" if variant in peak else "n/a"
