"""Attention critics: every exact path runs scaled_dot_product_attention on its MATH kernel, the only one
with a double backward, so transformer critics give the per-sample reference's norms and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradpen
from tests import _reference as ref

N, L, E = 4, 5, 8


class TransformerCritic(nn.Module):
    """A stock encoder layer over a sequence, mean-pooled to one score per sample."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 1)

    def forward(self, x):
        return self.head(self.layer(x).mean(1)).squeeze(1)


class SDPACritic(nn.Module):
    """One causal self-attention block written with F.scaled_dot_product_attention directly."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(E, 3 * E), nn.Linear(E, 1)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, E // 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(torch.tanh(y)).sum(1).squeeze(1)


def _grads(critic):
    """Parameter gradients, zeros where a parameter does not reach the penalty (a head bias); then cleared."""
    out = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    return out


def _data():
    g = torch.Generator().manual_seed(3)
    real, fake = (torch.randn(N, L, E, generator=g, dtype=torch.float64) for _ in range(2))
    return real, fake, torch.rand(N, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make", [TransformerCritic, SDPACritic], ids=["transformer", "sdpa"])
def test_attention_critic_matches_reference_loop(make, mode, backend):
    """WGAN-GP norms, values and parameter .grad equal the one-sample loop run under the MATH kernel."""
    torch.manual_seed(0)
    critic = make().double().train(mode == "train")
    real, fake, alpha = _data()

    gp, norms = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend, return_norms=True)
    gp.backward()
    got = _grads(critic)

    with sdpa_kernel(SDPBackend.MATH):
        want_gp, want_norms = ref.wgan_gp(critic, [real], [fake], alpha)
        want_gp.mean().backward()
    torch.testing.assert_close(norms, want_norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gp, want_gp.mean(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, _grads(critic), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_attention_r1_and_norms_under_a_fused_kernel_choice(backend):
    """Inside the user's sdpa_kernel(FLASH_ATTENTION), r1_penalty and gradient_norms still use MATH and match."""
    torch.manual_seed(0)
    critic = TransformerCritic().double()
    real = _data()[0]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        r1 = gradpen.r1_penalty(critic, real, backend=backend)
        norms = gradpen.gradient_norms(critic, real, backend=backend, create_graph=False)
        r1.backward()
    got = _grads(critic)
    with sdpa_kernel(SDPBackend.MATH):
        want = ref.per_sample_norms(critic, [real])
        want.square().mean().backward()
    torch.testing.assert_close(norms, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r1, want.square().mean(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, _grads(critic), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())


def _raising(critic):
    def run(x):
        critic(x)
        raise ZeroDivisionError("inside the critic")

    return run


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_kernel_choice_is_restored(backend):
    """The caller's SDPA kernel flags are the same after a penalty, also after a critic that raised."""
    critic = TransformerCritic().double()
    real, fake, _ = _data()
    defaults = _flags()  # torch's defaults differ by release (cuDNN attention is off by default in 2.4)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        before = _flags()
        gradpen.gradient_penalty(critic, real, fake, backend=backend)
        assert _flags() == before
        with pytest.raises(ZeroDivisionError, match="inside the critic"):
            gradpen.gradient_penalty(_raising(critic), real, fake, backend=backend)
        assert _flags() == before
    assert _flags() == defaults


@pytest.mark.parametrize("make", [TransformerCritic, SDPACritic], ids=["transformer", "sdpa"])
def test_attention_critics_stay_on_math_after_the_first_call(make):
    """Later calls keep the MATH kernel for an attention critic (nn.TransformerEncoderLayer reaches SDPA through
    multi_head_attention_forward), so repeated penalties never hit a fused kernel's missing double backward."""
    torch.manual_seed(0)
    critic = make().double()
    real, fake, alpha = _data()
    for _ in range(3):
        gradpen.gradient_penalty(critic, real, fake, alpha=alpha).backward()


def test_a_critic_without_attention_skips_the_kernel_context_after_the_first_call():
    """The MATH context costs a few microseconds per call; a critic whose checked graph has no softmax (no
    attention) runs later calls without it: the kernel flags inside its forward are the caller's."""
    seen = []
    net = nn.Sequential(nn.Linear(E, 8), nn.Tanh(), nn.Linear(8, 1))

    def critic(x):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return net(x).sum((1, 2))

    real, fake = torch.randn(N, L, E), torch.randn(N, L, E)
    for _ in range(3):
        gradpen.gradient_penalty(critic, real, fake)
    assert seen == [False, True, True]  # MATH only (flash off) on the first, checked call


def test_a_refused_fused_kernel_graph_does_not_mark_the_critic_attention_free():
    """gradient_norms_from refuses a forward made on a fused kernel (no double backward); the kernel's node
    counts as attention, so later penalties of the same critic still run it on MATH instead of being refused."""
    torch.manual_seed(0)
    critic = SDPACritic()  # float32: the CPU's fused kernel is the default choice
    x = torch.randn(N, L, E, requires_grad=True)
    with pytest.raises(gradpen.UnsupportedCriticError, match="double"):
        gradpen.gradient_norms_from(critic(x), x, critic=critic)
    real, fake, alpha = (t.float() for t in _data())
    gradpen.gradient_penalty(critic, real, fake, alpha=alpha).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in critic.qkv.parameters())
