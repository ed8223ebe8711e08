"""r1, r2, DRAGAN, WGAN-div and multi-input critics: closed forms, the reference loop, both backends."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradpen
from tests import _reference as ref

BACKENDS = ["autograd", "func"]
F64 = {"dtype": torch.float64}


def quadratic(x):
    """D(x) = ||x||^2 / 2 per sample: gradient x."""
    return 0.5 * x.flatten(1).pow(2).sum(1)


def linear(w):
    return lambda x: x.flatten(1) @ w


@given(n=st.integers(1, 8), d=st.integers(1, 6), backend=st.sampled_from(BACKENDS))
def test_r1_r2_closed_forms(n, d, backend):
    """R1 of the quadratic critic is E||x||^2 on the reals; R2 of a linear critic is ||w||^2."""
    x, w = torch.randn(n, d, **F64), torch.randn(d, **F64)
    torch.testing.assert_close(gradpen.r1_penalty(quadratic, x, backend=backend), x.pow(2).sum(1).mean())
    per_sample = gradpen.r2_penalty(linear(w), x, backend=backend, reduction="none")
    torch.testing.assert_close(per_sample, w.pow(2).sum().expand(n))


@given(n=st.integers(1, 6), backend=st.sampled_from(BACKENDS))
def test_r1_matches_reference_on_values_and_parameter_gradients(n, backend):
    """R1 of an MLP equals the per-sample loop's mean squared norm, and so do the critic's .grad."""
    critic = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 1)).double()
    x = torch.randn(n, 3, **F64)
    critic.zero_grad()
    want = ref.per_sample_norms(critic, [x]).pow(2).mean()
    want.backward()
    want_grads = [p.grad.clone() for p in list(critic.parameters())[:3]]
    critic.zero_grad()
    got = gradpen.r1_penalty(critic, x, backend=backend)
    got.backward()
    torch.testing.assert_close(got, want.detach())
    for g, w in zip([p.grad for p in list(critic.parameters())[:3]], want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dragan_points_lie_within_noise_scale_std_of_the_reals(backend):
    """DRAGAN's points satisfy 0 <= x_hat - x < s * std(x) per element, and the reals are actually perturbed."""
    x = torch.randn(64, 3, 4, **F64) * 2.0 + 1.0
    seen = []
    critic = lambda z: (seen.append(z.detach()), quadratic(z))[1]
    for s in (0.5, 2.0):
        seen.clear()
        gradpen.dragan_penalty(critic, x, noise_scale=s, backend="autograd")
        delta = seen[0] - x
        bound = s * x.std(correction=0)
        assert (delta >= 0).all()
        assert (delta < bound).all()
        assert delta.abs().max() > 0.5 * bound  # perturbed on the scale of s * std, not by a rounding error
    gen = lambda: torch.Generator().manual_seed(3)
    a = gradpen.dragan_penalty(quadratic, x, generator=gen(), backend=backend)
    b = gradpen.dragan_penalty(quadratic, x, generator=gen(), backend=backend)
    assert torch.equal(a, b)


@given(n=st.integers(1, 8), d=st.integers(1, 5), center=st.floats(0, 2), one_sided=st.booleans(),
       backend=st.sampled_from(BACKENDS))  # fmt: skip
def test_dragan_linear_closed_form(n, d, center, one_sided, backend):
    """A linear critic's DRAGAN penalty is (||w|| - c)^2, clamped when one-sided, wherever the points land."""
    w = torch.randn(d, **F64)
    got = gradpen.dragan_penalty(linear(w), torch.randn(n, d, **F64), center, one_sided, backend=backend)
    excess = w.norm() - center
    torch.testing.assert_close(got, (excess.clamp_min(0) if one_sided else excess) ** 2)


@pytest.mark.parametrize(("k", "p"), [(2.0, 6.0), (0.5, 2.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_wgan_div_formula(k, p, backend):
    """WGAN-div is k/2 * mean(||grad D(x_r)||^p + ||grad D(x_f)||^p): checked with the quadratic critic."""
    real, fake = torch.randn(6, 2, 3, **F64), torch.randn(6, 2, 3, **F64)
    got, norms = gradpen.wgan_div_penalty(quadratic, real, fake, k=k, p=p, backend=backend, return_norms=True)
    nr, nf = real.flatten(1).norm(dim=1), fake.flatten(1).norm(dim=1)
    torch.testing.assert_close(got, k / 2 * (nr**p + nf**p).mean())
    torch.testing.assert_close(norms, torch.stack([nr, nf]))


@given(
    n=st.integers(1, 6),
    shapes=st.lists(st.sampled_from([(3,), (2, 2), (1, 3, 3)]), min_size=2, max_size=3),
    backend=st.sampled_from(BACKENDS),
    center=st.floats(0, 2),
)
def test_multi_input_joint_norm_matches_reference(n, shapes, backend, center):
    """Tuples of inputs: same alpha for all, norm sqrt(sum_i ||g_i||^2), equal to the per-sample loop."""
    torch.manual_seed(n)
    heads = [nn.Linear(int(torch.tensor(s).prod()), 4).double() for s in shapes]

    def critic(*xs):
        return sum(torch.tanh(h(x.flatten(1))) for h, x in zip(heads, xs, strict=True)).prod(1)

    real = tuple(torch.randn(n, *s, **F64) for s in shapes)
    fake = tuple(torch.randn(n, *s, **F64) for s in shapes)
    alpha = torch.rand(n, **F64)
    want, want_norms = ref.wgan_gp(critic, list(real), list(fake), alpha, center)
    got, norms = gradpen.gradient_penalty(critic, real, fake, center, alpha=alpha, backend=backend, return_norms=True)
    torch.testing.assert_close(norms, want_norms.detach())
    torch.testing.assert_close(got, want.mean().detach())
    # the joint norm by hand, from the separate per-input norms
    grads = ref.per_sample_grads(critic, ref.interpolate(list(real), list(fake), alpha))
    by_hand = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms, by_hand.detach())


@pytest.mark.parametrize("fn", ["r1_penalty", "r2_penalty", "dragan_penalty"])
def test_multi_input_single_set_penalties(fn):
    """r1/r2/dragan accept tuples: the norm is joint over the inputs (two linear heads: sqrt(|w1|^2 + |w2|^2))."""
    w1, w2 = torch.randn(3, **F64), torch.randn(2, **F64)
    critic = lambda a, b: a @ w1 + b @ w2
    got = getattr(gradpen, fn)(critic, (torch.randn(5, 3, **F64), torch.randn(5, 2, **F64)))
    want = w1.pow(2).sum() + w2.pow(2).sum()
    torch.testing.assert_close(got, want if fn != "dragan_penalty" else (want.sqrt() - 1) ** 2)


def test_multi_input_critic_args_come_after_the_inputs():
    """The critic is called as critic(*inputs, *critic_args, **critic_kwargs)."""
    calls = []

    def critic(a, b, label, *, scale):
        calls.append((a.shape, b.shape, label, scale))
        return (a.sum(1) + b.sum(1)) * scale

    gradpen.r1_penalty(critic, (torch.randn(4, 3), torch.randn(4, 2)), critic_args=("y",), critic_kwargs={"scale": 2})
    assert calls == [((4, 3), (4, 2), "y", 2)]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: gradpen.dragan_penalty(quadratic, torch.randn(3, 2), noise_scale=0.0), ValueError,
         "`noise_scale` must be > 0, got 0"),
        (lambda: gradpen.wgan_div_penalty(quadratic, torch.randn(3, 2), torch.randn(3, 2), p=0.5), ValueError,
         "`p` must be >= 1, got 0.5"),
        (lambda: gradpen.wgan_div_penalty(quadratic, torch.randn(3, 2), torch.randn(3, 2), k=-1), ValueError,
         "`k` must be > 0, got -1"),
        (lambda: gradpen.wgan_div_penalty(quadratic, torch.randn(3, 2), torch.randn(3, 2), p=float("inf")),
         ValueError, "`p` must be finite, got inf"),
        (lambda: gradpen.wgan_div_penalty(quadratic, torch.randn(3, 2), torch.randn(3, 2), k=float("inf")),
         ValueError, "`k` must be finite, got inf"),
        (lambda: gradpen.dragan_penalty(quadratic, torch.randn(3, 2), noise_scale=float("inf")), ValueError,
         "`noise_scale` must be finite, got inf"),
        (lambda: gradpen.r1_penalty(quadratic, ()), TypeError, "`real` must be a Tensor or a non-empty tuple"),
        (lambda: gradpen.r2_penalty(quadratic, torch.randn(3, 2), reduction="avg"), ValueError,
         "Unknown reduction 'avg'"),
        (lambda: gradpen.gradient_penalty(quadratic, (torch.randn(3, 2),), (torch.randn(3, 2),) * 2), ValueError,
         "`real` and `fake` must hold the same number of tensors, got 1 and 2"),
        (lambda: gradpen.gradient_penalty(quadratic, (torch.randn(3, 2), torch.randn(4, 2)),
                                          (torch.randn(3, 2), torch.randn(4, 2))), ValueError,
         r"`real\[0\]` has N=3 but `real\[1\]` has N=4"),
        (lambda: gradpen.gradient_penalty(quadratic, (torch.randn(3, 2), torch.randn(3, 5)),
                                          (torch.randn(3, 2), torch.randn(3, 4))), ValueError,
         r"same shape \(input 1\), got \(3, 5\) and \(3, 4\)"),
    ],
)  # fmt: skip
def test_errors(call, error, match):
    """The extra penalties and multi-input calls reject bad input with messages naming the argument."""
    with pytest.raises(error, match=match):
        call()
