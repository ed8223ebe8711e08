"""DistributedDataParallel: 2 CPU processes (gloo), each with half of the batch, end with the same
gradients, equal to the average of the two single-process half-batch gradients (float64)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradpen

pytestmark = pytest.mark.slow
N, D = 16, 5


def _critic():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.ELU(), nn.Linear(16, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64),
            torch.rand(N, generator=g, dtype=torch.float64))  # fmt: skip


def _loss(critic, real, fake, alpha, backend):
    gp = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
    return critic(fake).mean() - critic(real).mean() + 10.0 * gp


def _worker(rank, world, store_path, out_dir, backend):
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    critic = DDP(_critic())
    real, fake, alpha = (t.chunk(world)[rank] for t in _data())
    _loss(critic, real, fake, alpha, backend).backward()  # always through the DDP wrapper
    torch.save([p.grad for p in critic.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_ddp_gradients_equal_average_of_half_batches(tmp_path, backend):
    """Both ranks hold identical gradients, equal to the mean of the single-process half-batch gradients."""
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), backend), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    expected = None
    for real, fake, alpha in zip(*(t.chunk(2) for t in _data()), strict=True):
        critic = _critic()
        _loss(critic, real, fake, alpha, backend).backward()
        grads = [p.grad for p in critic.parameters()]
        expected = grads if expected is None else [(a + b) / 2 for a, b in zip(expected, grads, strict=True)]

    for a, b, want in zip(ranks[0], ranks[1], expected, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want, rtol=1e-12, atol=1e-14)
