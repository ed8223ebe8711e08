"""gradient_norms_from: norms from a forward that already ran equal the ones gradpen computes itself."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradpen
from tests import _reference as ref
from tests._critics import critics

F64 = {"dtype": torch.float64}


def _param_grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


@given(spec=critics(), n=st.integers(1, 8), create_graph=st.booleans())
def test_equals_gradient_norms_and_the_loop(spec, n, create_graph):
    """From the same forward, the norms equal gradient_norms and the one-sample loop, on values and on the
    critic's .grad after backward of the squared norms (hypothesis critics: MLPs, conv nets, maps)."""
    critic, shape = spec
    x = torch.randn(n, *shape, **F64)
    critic.zero_grad()
    want = ref.per_sample_norms(critic, [x])
    want.square().sum().backward()
    want_grads = _param_grads(critic)
    torch.testing.assert_close(gradpen.gradient_norms(critic, x, create_graph=False), want.detach())

    critic.zero_grad()
    leaf = x.clone().requires_grad_(True)
    got = gradpen.gradient_norms_from(critic(leaf), leaf, create_graph=create_graph)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    assert got.requires_grad == create_graph
    if create_graph:
        got.square().sum().backward()
        for g, w in zip(_param_grads(critic), want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@given(n=st.integers(1, 6), shapes=st.sampled_from([((3,), (2,)), ((2, 2), (4,)), ((1, 3, 3), (5,))]))
def test_multi_input_joint_norm(n, shapes):
    """A tuple of inputs gives the joint norm over all of them, as gradient_norms does."""
    torch.manual_seed(n)
    a_shape, b_shape = shapes
    wa, wb = torch.randn(*a_shape, **F64), torch.randn(*b_shape, **F64)
    dims_a, dims_b = tuple(range(1, len(a_shape) + 1)), tuple(range(1, len(b_shape) + 1))
    critic = lambda a, b: torch.tanh((a * wa).sum(dims_a) + (b * wb).sum(dims_b))
    a = torch.randn(n, *a_shape, **F64).requires_grad_(True)
    b = torch.randn(n, *b_shape, **F64).requires_grad_(True)
    got = gradpen.gradient_norms_from(critic(a, b), (a, b))
    torch.testing.assert_close(got, gradpen.gradient_norms(critic, (a.detach(), b.detach())))
    torch.testing.assert_close(got, ref.per_sample_norms(critic, [a.detach(), b.detach()]).detach())


def test_the_loss_can_still_be_backpropagated():
    """The forward's graph survives (even with create_graph=False), so the loss built on it backpropagates,
    and the critic's .grad equals the two-forward computation."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.randn(8, 4, **F64)
    for create_graph in (False, True):
        critic.zero_grad()
        leaf = x.clone().requires_grad_(True)
        out = critic(leaf)
        norms = gradpen.gradient_norms_from(out, leaf, create_graph=create_graph)
        loss = nn.functional.softplus(-out).mean() + (norms.square().mean() if create_graph else 0.0)
        loss.backward()
        got = _param_grads(critic)
        critic.zero_grad()
        want_loss = nn.functional.softplus(-critic(x)).mean()
        if create_graph:
            want_loss = want_loss + gradpen.r1_penalty(critic, x)
        want_loss.backward()
        for g, w in zip(got, _param_grads(critic), strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("scale", [1.0, 2.0**16, 2.0**24])
def test_gradscaler_fp16_is_finite_and_unscaled(scale):
    """Under fp16 autocast with a GradScaler at any scale, the norms are float32 and equal the fp32 ones."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(8, 16, requires_grad=True)
    want = gradpen.gradient_norms_from(critic(x), x)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    with torch.autocast("cpu", dtype=torch.float16):
        got = gradpen.gradient_norms_from(critic(x), x, scaler=scaler)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=5e-3, atol=1e-4)


def test_zero_gradient_gives_zero_norms_and_finite_grads():
    """A dead ReLU critic (outputs attached to the inputs, gradient exactly 0) gives zero norms, finite gradients;
    a critic that ignores one of two inputs gives that input a zero part of the joint norm."""
    critic = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        critic[0].bias.fill_(-100.0)
    x = torch.randn(5, 3, requires_grad=True)
    norms = gradpen.gradient_norms_from(critic(x), x)
    norms.square().sum().backward()
    assert torch.equal(norms, torch.zeros(5))
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)
    y = torch.randn(5, 2, requires_grad=True)
    torch.testing.assert_close(gradpen.gradient_norms_from((x * 2).sum(1), (x, y)), torch.full((5,), 2 * 3**0.5))


def test_float64_stays_float64():
    """float64 outputs give float64 norms."""
    x = torch.randn(3, 2, **F64, requires_grad=True)
    assert gradpen.gradient_norms_from((x**2).sum(1), x).dtype == torch.float64


def test_errors():
    """Inputs that do not require grad, outputs without a batch dimension and bad types get clear errors."""
    critic = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`inputs` does not require grad.*x\.detach\(\)\.requires_grad_\(True\)"):
        gradpen.gradient_norms_from(critic(x), x)
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"`outputs` must be one score per sample.*N=4.*scalar"):
        gradpen.gradient_norms_from(critic(leaf).mean(), leaf)
    with pytest.raises(ValueError, match=r"leading dimension N=4.*got shape \(1,\)"):
        gradpen.gradient_norms_from(critic(leaf).sum(0), leaf)
    with pytest.raises(TypeError, match="`outputs` must be a Tensor, got list"):
        gradpen.gradient_norms_from([1.0], leaf)
    with pytest.raises(ValueError, match=r"`inputs\[1\]` does not require grad"):
        gradpen.gradient_norms_from(critic(leaf), (leaf, x))
    with pytest.raises(TypeError, match="`create_graph` must be a bool"):
        gradpen.gradient_norms_from(critic(leaf), leaf, create_graph=None)


# --------------------------------------------------------------------------- refusals instead of silent zeros


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda net, x: (net(x).detach(), x), "not attached to a graph.*detached"),
        (lambda net, x: (_under_no_grad(net, x), x), r"not attached to a graph: the forward ran under torch.no_grad"),
        (
            lambda net, x: (net(x), x.detach().requires_grad_(True)),
            "not computed from `inputs`.*made after the forward",
        ),
        (
            lambda net, x: (x, net(x)),
            r"Are the arguments swapped\? The order is gradient_norms_from\(outputs, inputs\)",
        ),
    ],
    ids=["detached", "no_grad", "leaf-after-forward", "swapped"],
)
def test_outputs_not_attached_to_the_inputs_are_refused(make, match):
    """Outputs that never reached the inputs (detached, a no_grad forward, a leaf made after the forward, the
    arguments swapped as R3GAN orders them) raise, naming the likely cause, instead of returning zero norms."""
    x = torch.randn(5, 3, requires_grad=True)
    outputs, inputs = make(_net(), x)
    with pytest.raises(ValueError, match=match):
        gradpen.gradient_norms_from(outputs, inputs)


def _under_no_grad(net, x):
    with torch.no_grad():
        return net(x)


def test_non_leaf_inputs_are_refused():
    """R2 from the loss's forward on an undetached fake would send the penalty's gradient into the generator:
    a non-leaf input is refused, as r2_penalty treats fake as a constant."""
    gen = nn.Linear(2, 3)
    fake = gen(torch.randn(5, 2))  # requires grad, not a leaf
    net = _net()
    with pytest.raises(ValueError, match=r"is not a leaf.*generator"):
        gradpen.gradient_norms_from(net(fake), fake)
    leaf = fake.detach().requires_grad_(True)
    gradpen.gradient_norms_from(net(leaf), leaf).square().mean().backward()
    assert gen.weight.grad is None


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_ops_without_a_double_backward_are_refused_from_the_graph():
    """A critic whose last op is @once_differentiable is refused like r1_penalty refuses it (not silently wrong),
    and a fused-SDPA critic is refused at the call, naming backend='fd', not later in loss.backward()."""
    net = _net()
    x = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(gradpen.UnsupportedCriticError, match="once_differentiable"):
        gradpen.gradient_norms_from(_OnceTanh.apply(net(x)), x)
    q = torch.randn(2, 2, 6, 4)
    x = q.clone().requires_grad_(True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(x, x, x).flatten(1).sum(1)
    with pytest.raises(gradpen.UnsupportedCriticError, match=r"without a double backward.*backend='fd'"):
        gradpen.gradient_norms_from(out, x)


def test_critic_given_makes_the_checks_once_per_critic_and_warns_about_coupling():
    """With critic=, a minibatch-std critic gets the batch-coupling warning (its R1 is the batch-sum gradient,
    StyleGAN2's); a per-sample critic gets none."""

    class MinibatchStd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(3, 8), nn.Linear(9, 1)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.head(torch.cat([h, h.std(0).mean().expand(x.shape[0], 1)], 1))

    coupled, plain = MinibatchStd(), _net()
    x = torch.randn(6, 3, requires_grad=True)
    with pytest.warns(UserWarning, match=r"couples the samples of a batch.*StyleGAN2"):
        gradpen.gradient_norms_from(coupled(x), x, critic=coupled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradpen.gradient_norms_from(plain(x), x, critic=plain)
