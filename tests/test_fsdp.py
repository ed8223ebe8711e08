"""FSDP2 and static-graph DDP with 2 CPU processes (gloo): every exact penalty is refused on every rank,
before any work, with the gradpen error; DDP(find_unused_parameters=True) stays exact. (Default DDP is
checked the same way in tests/test_ddp.py.) One spawn serves every test here."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradpen

pytestmark = pytest.mark.slow
WORLD = 2
CASES = [
    "fsdp2",
    "ddp_static_graph",
    "ddp_set_static_graph",
    "fsdp2_in_a_list_in_a_closure",
    "ddp_static_graph_in_an_object",
]


class Holder:
    """A callable object that wraps the critic, as training code does (an EMA helper, a loss object)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x)


def _in_a_closure(nets):
    inner = lambda x: nets[0](x)
    return lambda x: inner(x)  # a closure over a function whose closure holds a list


CALLS = ["gradient_penalty/autograd", "gradient_penalty/func", "r1_penalty/autograd", "gradient_norms/func"]


def _critic():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ELU(), nn.Linear(16, 1))


def _wrap(case):
    if case == "fsdp2_in_a_list_in_a_closure":
        return _in_a_closure([_wrap("fsdp2")])
    if case == "ddp_static_graph_in_an_object":
        return Holder(_wrap("ddp_static_graph"))
    critic = _critic()
    if case == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch<2.6: FSDP2 lived in torch.distributed._composable.fsdp
            from torch.distributed._composable.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(critic[0], mesh=mesh)
        return fully_shard(critic, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel as DDP

    if case == "ddp_static_graph":
        return DDP(critic, static_graph=True)
    ddp = DDP(critic)
    ddp._set_static_graph()
    return ddp


def _call(name, critic, real, fake):
    fn, backend = name.split("/")
    if fn == "gradient_penalty":
        return gradpen.gradient_penalty(critic, real, fake, backend=backend)
    if fn == "r1_penalty":
        return gradpen.r1_penalty(critic, real, backend=backend)
    return gradpen.gradient_norms(critic, real, backend=backend)


def _halves():
    """A float64 batch of 8 (real, fake, alpha), split into one half per rank."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    return list(zip(*(t.chunk(WORLD) for t in [*data, torch.rand(8, generator=g, dtype=torch.float64)]), strict=True))


def _gp_step(critic, real, fake, alpha, backend):
    gp = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
    (critic(fake).mean() - critic(real).mean() + 10.0 * gp).backward()
    return [p.grad.tolist() for p in critic.parameters()]


def _worker(rank, store_path, out_dir):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    from torch.nn.parallel import DistributedDataParallel as DDP

    grads = {"autograd": _gp_step(DDP(_critic().double(), find_unused_parameters=True), *_halves()[rank], "autograd")}
    try:  # DDP's find_unused_parameters path runs an autograd.Function that torch.func cannot transform
        _gp_step(DDP(_critic().double(), find_unused_parameters=True), *_halves()[rank], "func")
        grads["func"] = ["no error", ""]
    except Exception as e:  # recorded for the test to judge
        grads["func"] = [type(e).__name__, str(e)]
    real, fake = torch.randn(4, 5), torch.randn(4, 5)
    seen = {}
    for case in CASES:
        critic = _wrap(case)
        for name in CALLS:
            try:
                _call(name, critic, real, fake)
                seen[f"{case} {name}"] = ["no error", ""]
            except Exception as e:  # recorded for the test to judge
                seen[f"{case} {name}"] = [type(e).__name__, str(e)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"refusals": seen, "grads": grads}, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """What each rank saw for each wrapper and call, from one spawn of 2 processes."""
    d = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(d / "store"), str(d)), nprocs=WORLD, join=True)
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", ["fsdp2", "fsdp2_in_a_list_in_a_closure"])
@pytest.mark.parametrize("name", CALLS)
def test_fsdp2_exact_penalties_refused_on_every_rank(outcomes, case, name):
    """With fully_shard (FSDP2), also hidden in a list in a nested closure, every exact penalty raises
    UnsupportedCriticError naming FSDP, on both ranks."""
    for seen in outcomes:
        kind, msg = seen["refusals"][f"{case} {name}"]
        assert kind == "UnsupportedCriticError", (kind, msg)
        assert "FSDP module" in msg and "FSDPSequential" in msg and "approx_gradient_penalty" in msg


@pytest.mark.parametrize("case", ["ddp_static_graph", "ddp_set_static_graph", "ddp_static_graph_in_an_object"])
@pytest.mark.parametrize("name", CALLS)
def test_static_graph_ddp_refused_on_every_rank(outcomes, case, name):
    """DDP(static_graph=True), or DDP after _set_static_graph(), also behind a callable wrapper object, raises
    naming static_graph and the fix."""
    for seen in outcomes:
        kind, msg = seen["refusals"][f"{case} {name}"]
        assert kind == "UnsupportedCriticError", (kind, msg)
        assert "static_graph=True" in msg and "Build DDP without static_graph" in msg


def test_ddp_find_unused_parameters_matches_average_of_half_batches(outcomes):
    """With find_unused_parameters=True both ranks hold the mean of the single-process half-batch gradients."""
    expected = [torch.zeros_like(p, dtype=torch.float64) for p in _critic().parameters()]
    for half in _halves():
        for e, g in zip(expected, _gp_step(_critic().double(), *half, "autograd"), strict=True):
            e += torch.tensor(g, dtype=torch.float64) / WORLD
    for seen in outcomes:
        for got, want in zip(seen["grads"]["autograd"], expected, strict=True):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-12, atol=1e-14)


def test_ddp_find_unused_parameters_with_func_is_refused(outcomes):
    """backend='func' through DDP(find_unused_parameters=True) raises the gradpen error pointing to autograd."""
    for seen in outcomes:
        kind, msg = seen["grads"]["func"]
        assert kind == "UnsupportedCriticError", (kind, msg)
        assert "backend='func' cannot run" in msg and "backend='autograd'" in msg
