"""GradientPenalty: weight, lazy regularisation, state, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradpen


def _setup():
    critic = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    return critic, torch.randn(5, 2, 3), torch.randn(5, 2, 3), torch.rand(5)


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_returns_weight_times_functional(backend):
    """gp(critic, real, fake) is weight * gradient_penalty(...) with the module's settings."""
    critic, real, fake, alpha = _setup()
    gp = gradpen.GradientPenalty(weight=3.0, center=0.5, one_sided=True, backend=backend)
    want, norms = gradpen.gradient_penalty(critic, real, fake, 0.5, True, alpha=alpha, return_norms=True)
    torch.testing.assert_close(gp(critic, real, fake, alpha=alpha), 3.0 * want)
    torch.testing.assert_close(gp.last_norms, norms.detach())
    assert not gp.last_norms.requires_grad


def test_lazy_every_k_applies_first_then_every_kth_call_times_k():
    """every=3: calls 0, 3, 6 return 3 * weight * penalty; the others return an exact zero."""
    critic, real, fake, alpha = _setup()
    gp = gradpen.GradientPenalty(weight=2.0, every=3)
    full = gradpen.gradient_penalty(critic, real, fake, alpha=alpha)
    outs = [gp(critic, real, fake, alpha=alpha) for _ in range(7)]
    for i, out in enumerate(outs):
        if i % 3 == 0:
            torch.testing.assert_close(out, 6.0 * full)
        else:
            assert torch.equal(out, torch.zeros(()))
    assert gp.calls == 7
    assert gp(critic, real, fake, alpha=alpha, reduction="none").shape == (5,)  # call 7: zero, per sample


def test_call_counter_round_trips_through_state_dict():
    """The lazy-regularisation counter is saved and restored, so a resumed run stays in phase."""
    critic, real, fake, _ = _setup()
    gp = gradpen.GradientPenalty(every=4)
    for _ in range(5):
        gp(critic, real, fake)
    other = gradpen.GradientPenalty(every=4)
    other.load_state_dict(gp.state_dict())
    assert other.calls == 5


@pytest.mark.parametrize(
    ("kind", "fn", "uses"),
    [
        ("r1", gradpen.r1_penalty, "real"),
        ("r2", gradpen.r2_penalty, "fake"),
        ("wgan-div", gradpen.wgan_div_penalty, "both"),
    ],
)
def test_kinds_dispatch_to_their_functional(kind, fn, uses):
    """kind= selects the functional and the inputs it uses, with the same weight semantics."""
    critic, real, fake, _ = _setup()
    gp = gradpen.GradientPenalty(weight=0.5, kind=kind)
    args = {"real": (real,), "fake": (fake,), "both": (real, fake)}[uses]
    torch.testing.assert_close(gp(critic, real, fake), 0.5 * fn(critic, *args))


def test_dragan_kind_uses_real_and_generator():
    """kind='dragan' perturbs the reals; the same generator seed gives the same value as the functional."""
    critic, real, _, _ = _setup()
    gp = gradpen.GradientPenalty(weight=1.0, kind="dragan")
    got = gp(critic, real, None, generator=torch.Generator().manual_seed(1))
    want = gradpen.dragan_penalty(critic, real, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": -1.0}, ValueError, "`weight` must be >= 0, got -1"),
        ({"every": 0}, ValueError, "`every` must be >= 1, got 0"),
        ({"every": 2.0}, TypeError, "`every` must be an int, got float"),
        ({"center": -0.1}, ValueError, "`center` must be >= 0"),
        (
            {"kind": "wgan"},
            ValueError,
            r"Unknown kind 'wgan'. Expected one of \['dragan', 'r1', 'r2', 'wgan-div', 'wgan-gp'\]",
        ),
        ({"backend": "jit"}, ValueError, "Unknown backend 'jit'"),
        ({"kind": "r1", "center": 0.0}, ValueError, "`center` and `one_sided` do not apply to kind='r1'"),
        ({"one_sided": "no"}, TypeError, "`one_sided` must be a bool"),
        ({"weight": float("inf")}, ValueError, "`weight` must be finite, got inf"),
        ({"center": float("inf")}, ValueError, "`center` must be finite, got inf"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, error, match):
    """Bad settings fail when the module is built, with a message naming the setting."""
    with pytest.raises(error, match=match):
        gradpen.GradientPenalty(**kwargs)


def test_bad_call_arguments():
    """Missing inputs and keywords the module owns are rejected with a clear message."""
    critic, real, fake, _ = _setup()
    with pytest.raises(ValueError, match="kind='r2' needs `fake`, got None"):
        gradpen.GradientPenalty(kind="r2")(critic, real, None)
    with pytest.raises(TypeError, match=r"read the norms from `\.last_norms`"):
        gradpen.GradientPenalty()(critic, real, fake, return_norms=True)


def test_skipped_call_supports_its_own_backward():
    """StyleGAN-style `pen(D, real, None).backward()` works on skipped calls and leaves the critic untouched."""
    critic, real, _, _ = _setup()
    pen = gradpen.GradientPenalty(weight=5.0, kind="r1", every=4)
    pen(critic, real, None).backward()  # call 0: active
    assert critic[1].weight.grad is not None
    critic.zero_grad(set_to_none=True)
    for _ in range(3):  # calls 1-3: skipped
        out = pen(critic, real, None)
        out.backward()
        assert out.item() == 0.0
    assert all(p.grad is None for p in critic.parameters())


def test_call_that_raises_keeps_its_turn():
    """A call that fails (OOM, a bad batch) does not use up the active slot: the retry computes the penalty."""
    critic, real, fake, alpha = _setup()
    pen = gradpen.GradientPenalty(weight=1.0, every=3)

    def failing(x):
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        pen(failing, real, fake, alpha=alpha)
    assert pen.calls == 0
    torch.testing.assert_close(
        pen(critic, real, fake, alpha=alpha), 3.0 * gradpen.gradient_penalty(critic, real, fake, alpha=alpha)
    )
    assert pen.calls == 1


@pytest.mark.slow
def test_compiled_step_compiles_a_bounded_number_of_graphs():
    """A compiled step that calls a lazy GradientPenalty 12 times compiles a few graphs, not one per call, and
    returns what eager mode returns on every call."""
    import torch._dynamo

    critic, real, fake, alpha = _setup()
    eager = gradpen.GradientPenalty(weight=2.0, every=4)
    compiled_pen = gradpen.GradientPenalty(weight=2.0, every=4)

    def step(pen, real, fake, alpha):
        return critic(fake).mean() - critic(real).mean() + pen(critic, real, fake, alpha=alpha)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step)
    for _ in range(12):
        torch.testing.assert_close(compiled(compiled_pen, real, fake, alpha), step(eager, real, fake, alpha))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled_pen.calls == eager.calls == 12
    assert frames <= 6, f"{frames} graphs compiled for 12 calls"


@pytest.mark.parametrize("every", [1, 4, 16])
def test_lazy_adam_kwargs_is_stylegan2s_correction(every):
    """lr * c and betas ** c with c = k / (k + 1) (StyleGAN2-ADA's mb_ratio); k = 1 changes nothing."""
    got = gradpen.lazy_adam_kwargs(0.002, (0.0, 0.99), every)
    c = every / (every + 1) if every > 1 else 1.0
    assert got == {"lr": 0.002 * c, "betas": (0.0, 0.99**c)}
    if every == 16:  # StyleGAN2's R1 interval, by hand: 16/17 = 0.941176...
        assert abs(got["lr"] - 0.0018823529) < 1e-9
        assert abs(got["betas"][1] - 0.9905854573) < 1e-9


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 0.0}, ValueError, "`lr` must be > 0"),
        ({"lr": float("nan")}, ValueError, "`lr` must not be NaN"),
        ({"betas": (0.0, 1.0)}, ValueError, r"`betas\[1\]` must be < 1, got 1"),
        ({"betas": (-0.1, 0.9)}, ValueError, r"`betas\[0\]` must be >= 0"),
        ({"betas": 0.9}, TypeError, r"`betas` must be a pair"),
        ({"every": 0}, ValueError, "`every` must be >= 1"),
    ],
)
def test_lazy_adam_kwargs_errors(kwargs, error, match):
    """Bad settings of lazy_adam_kwargs name the argument."""
    with pytest.raises(error, match=match):
        gradpen.lazy_adam_kwargs(**{"lr": 0.002, "betas": (0.0, 0.99), "every": 4, **kwargs})
