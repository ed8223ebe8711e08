"""torch.compile: the func backend runs compiled and matches eager; the autograd backend never hits
PyTorch's "does not currently support double backward" error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradpen
from gradpen import _compat

pytestmark = pytest.mark.slow


def _setup():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    return critic, torch.randn(16, 3), torch.randn(16, 3), torch.rand(16)


def _grads(critic):
    return [p.grad.clone() if p.grad is not None else None for p in critic.parameters()]


def _eager_reference(critic, real, fake, alpha):
    critic.zero_grad(set_to_none=True)
    loss = critic(fake).mean() - critic(real).mean() + 10 * gradpen.gradient_penalty(critic, real, fake, alpha=alpha)
    loss.backward()
    return loss.detach(), _grads(critic)


def _assert_grads_close(got, want):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# Below COMPILE_REGION the penalty runs eagerly inside a compiled function (a graph break): no fullgraph.
FULLGRAPH = _compat.TORCH >= _compat.COMPILE_REGION


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_compiled_critic_step_matches_eager(backend):
    """A fullgraph-compiled critic loss with the penalty equals eager mode in value and parameter gradients
    (the autograd backend routes itself to func inside the compiled region). Below COMPILE_REGION the
    step compiles with a graph break around the penalty and still equals eager mode."""
    critic, real, fake, alpha = _setup()
    want, want_grads = _eager_reference(critic, real, fake, alpha)

    @torch.compile(fullgraph=FULLGRAPH)
    def loss_fn(real, fake, alpha):
        gp = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
        return critic(fake).mean() - critic(real).mean() + 10 * gp

    critic.zero_grad(set_to_none=True)
    got = loss_fn(real, fake, alpha)
    got.backward()
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    _assert_grads_close(_grads(critic), want_grads)


def test_compiled_critic_module_with_autograd_backend():
    """gradient_penalty(torch.compile(critic)) with the default backend does not raise the double-backward error."""
    critic, real, fake, alpha = _setup()
    critic.zero_grad(set_to_none=True)
    want = gradpen.gradient_penalty(critic, real, fake, alpha=alpha)
    want.backward()
    want_grads = _grads(critic)
    critic.zero_grad(set_to_none=True)
    got = gradpen.gradient_penalty(torch.compile(critic), real, fake, alpha=alpha)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_grads_close(_grads(critic), want_grads)


@pytest.mark.skipif(FULLGRAPH, reason="this torch traces gradpen inside a compiled region")
def test_fullgraph_below_compile_region_names_the_torch_it_needs():
    """Below COMPILE_REGION, torch.compile(fullgraph=True) around a penalty fails with dynamo's error for a
    disabled function (naming gradpen's reason from torch 2.8 on), not an internal dynamo error."""
    critic, real, fake, alpha = _setup()
    torch._dynamo.reset()
    fn = torch.compile(lambda r, f, a: gradpen.gradient_penalty(critic, r, f, alpha=a), fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable") as info:
        fn(real, fake, alpha)
    if _compat.TORCH >= (2, 8):
        assert f"needs torch>={_compat.COMPILE_REGION[0]}.{_compat.COMPILE_REGION[1]}" in str(info.value)
