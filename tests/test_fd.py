"""backend="fd": the exact penalty's value and a finite-difference parameter gradient, with no double backward.

The reference is always the exact penalty of the autograd backend (a double backward) on the same critic,
inputs and RNG state; fd must give the same value and norms to rounding, and the same parameter gradient
to the accuracy of its finite difference (float64 <= 1e-6 relative, float32 <= 2e-3).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradpen
from tests._critics import critics

F64 = {"dtype": torch.float64}


def _grad_vector(module):
    """The parameter gradients as one vector (zeros where a parameter got none), then cleared."""
    out = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in module.parameters()])
    module.zero_grad(set_to_none=True)
    return out


def _run(module, penalty, seed=0):
    """``penalty()`` from the global RNG state ``seed``, backpropagated: (value, norms, parameter gradient)."""
    torch.manual_seed(seed)
    value, norms = penalty()
    value.backward()
    return value.detach(), norms.detach(), _grad_vector(module)


def _rel(a, b):
    """Relative distance of two gradient vectors; 0 when both are exactly 0 (a one-sided penalty below its center)."""
    if not (a.any() or b.any()):
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# Every penalty, as a function of (critic, real, fake, backend) returning (value, norms).
KINDS = {
    "wgan-gp": lambda c, r, f, b: gradpen.gradient_penalty(c, r, f, backend=b, return_norms=True),
    "lp": lambda c, r, f, b: gradpen.gradient_penalty(c, r, f, 0.05, True, backend=b, return_norms=True),
    "zero-centred": lambda c, r, f, b: gradpen.gradient_penalty(c, r, f, 0.0, backend=b, return_norms=True),
    "r1": lambda c, r, f, b: gradpen.r1_penalty(c, r, backend=b, return_norms=True),
    "r2": lambda c, r, f, b: gradpen.r2_penalty(c, f, backend=b, return_norms=True),
    "dragan": lambda c, r, f, b: gradpen.dragan_penalty(c, r, backend=b, return_norms=True),
    "wgan-div": lambda c, r, f, b: gradpen.wgan_div_penalty(c, r, f, backend=b, return_norms=True),
}


def _compare(critic, real, fake, kind, backend="fd", seed=0):
    want = _run(critic, lambda: KINDS[kind](critic, real, fake, "autograd"), seed)
    got = _run(critic, lambda: KINDS[kind](critic, real, fake, backend), seed)
    return got, want


# --------------------------------------------------------------------------- accuracy against the exact penalty


@given(spec=critics(smooth=True), n=st.integers(1, 8), kind=st.sampled_from(sorted(KINDS)))
def test_fd_equals_exact_on_smooth_critics_float64(spec, n, kind):
    """float64, smooth MLP and conv critics, every penalty: fd's value and norms equal the exact ones to
    rounding, its parameter gradient is within 1e-6 relative of the double backward's."""
    critic, shape = spec
    real, fake = torch.randn(n, *shape, **F64), torch.randn(n, *shape, **F64)
    (v, nrm, g), (v0, nrm0, g0) = _compare(critic, real, fake, kind)
    torch.testing.assert_close(v, v0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nrm, nrm0, rtol=1e-12, atol=1e-14)
    assert _rel(g, g0) <= 1e-6 or (g - g0).abs().max() < 1e-12


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_fd_equals_exact_float32(kind, net):
    """float32 (the default step 5 eps^(1/3) RMS): the parameter gradient is within 2e-3 relative of the
    exact one (the double backward at the same points, itself within 1e-5 of float64 where the points do not
    depend on the dtype's random draws), the value within float32 rounding of the exact value."""
    torch.manual_seed(1)
    if net == "mlp":
        critic, shape = (
            nn.Sequential(nn.Linear(12, 64), nn.SiLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)),
            (12,),
        )
    else:
        critic = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 1),
        )  # fmt: skip
        shape = (1, 8, 8)
    real, fake = torch.randn(32, *shape), torch.randn(32, *shape)
    got = _run(critic, lambda: KINDS[kind](critic, real, fake, "fd"))
    exact32 = _run(critic, lambda: KINDS[kind](critic, real, fake, "autograd"))
    torch.testing.assert_close(got[0], exact32[0], rtol=1e-5, atol=1e-6)
    assert _rel(got[2], exact32[2]) <= 2e-3
    if kind in ("r1", "r2", "wgan-div"):  # deterministic points: the float32 reference against float64
        critic64 = critic.double()
        want = _run(critic64, lambda: KINDS[kind](critic64, real.double(), fake.double(), "autograd"))
        assert _rel(exact32[2].double(), want[2]) <= 1e-5
        assert _rel(got[2].double(), want[2]) <= 2e-3


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_fd_step_is_scale_free(scale):
    """Inputs x * s with the critic D(x / s): the relative error of fd's R1 gradient stays within 2e-3 for
    s = 0.01 .. 100 (a fixed step would lose up to 1000x at the ends)."""
    torch.manual_seed(2)
    body = nn.Sequential(nn.Linear(10, 64), nn.SiLU(), nn.Linear(64, 1))
    critic = lambda x: body(x / scale)
    x = torch.randn(64, 10) * scale
    got = _run(body, lambda: gradpen.r1_penalty(critic, x, backend="fd", return_norms=True))
    body64 = body.double()
    want = _run(body64, lambda: gradpen.r1_penalty(lambda z: body64(z / scale), x.double(), return_norms=True))
    assert _rel(got[2].double(), want[2]) <= 2e-3


def test_fd_forward_scheme_and_explicit_step():
    """scheme='forward' (one forward fewer) and an explicit step give the exact value and a gradient within
    their truncation error: forward O(h), central O(h^2), both small at float64."""
    torch.manual_seed(3)
    critic = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    x = torch.randn(16, 6, **F64)
    want = _run(critic, lambda: gradpen.r1_penalty(critic, x, return_norms=True))
    forward = gradpen.FiniteDifference(scheme="forward")
    for backend, tol in [(forward, 1e-6), (gradpen.FiniteDifference(step=1e-3), 1e-5)]:
        got = _run(critic, lambda b=backend: gradpen.r1_penalty(critic, x, backend=b, return_norms=True))
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
        assert _rel(got[2], want[2]) <= tol
    coarse = _run(
        critic, lambda: gradpen.r1_penalty(critic, x, backend=gradpen.FiniteDifference(step=0.3), return_norms=True)
    )
    assert _rel(coarse[2], want[2]) > 1e-4  # a coarse step is visibly worse: the step is used


def test_multi_input_critic_joint_direction_and_critic_args():
    """A two-input critic with a per-sample label (a constant) and a shared embedding table (a parameter-like
    tensor that keeps its gradient): fd equals the exact penalty, the table's gradient included."""
    torch.manual_seed(4)
    body = nn.Sequential(nn.Linear(5 + 3 + 4, 32), nn.GELU(), nn.Linear(32, 1)).double()
    table = torch.randn(10, 4, **F64, requires_grad=True)

    def critic(a, b, labels, emb):
        return body(torch.cat([a, b, emb[labels]], 1))

    real, fake = (
        (torch.randn(8, 5, **F64), torch.randn(8, 3, **F64)),
        (torch.randn(8, 5, **F64), torch.randn(8, 3, **F64)),
    )
    labels = torch.randint(0, 10, (8,))

    def pen(backend):
        out = gradpen.gradient_penalty(
            critic, real, fake, backend=backend, critic_args=(labels, gradpen.shared(table)), return_norms=True
        )
        return out

    results = []
    for backend in ("autograd", "fd"):
        torch.manual_seed(5)
        value, norms = pen(backend)
        value.backward()
        results.append((value.detach(), norms, _grad_vector(body), table.grad.clone()))
        table.grad = None
    (v, n, g, t), (v0, n0, g0, t0) = results[1], results[0]
    torch.testing.assert_close(v, v0, rtol=1e-12, atol=0)
    torch.testing.assert_close(n, n0, rtol=1e-12, atol=0)
    assert _rel(g, g0) <= 1e-6 and _rel(t, t0) <= 1e-6


def test_zero_gradient_gives_no_nan():
    """Samples whose input gradient is exactly 0 (u undefined) give norm 0 and finite gradients, equal to the
    exact backend's."""
    w = torch.randn(3, **F64, requires_grad=True)
    critic = lambda x: (x * w).sum(1).square()  # gradient 2 (x . w) w: zero where x = 0
    x = torch.randn(6, 3, **F64)
    x[:3] = 0.0
    results = []
    for backend in ("autograd", "fd"):
        value, norms = gradpen.gradient_penalty(critic, x, x, backend=backend, return_norms=True)
        (grad,) = torch.autograd.grad(value, w)
        results.append((value, norms, grad))
    assert torch.equal(results[1][1][:3], torch.zeros(3))
    assert torch.isfinite(results[1][2]).all()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-6, atol=1e-12)


def test_float64_stays_float64_and_no_grad_logging():
    """float64 inputs give float64 values; create_graph=False gives the plain norm, also under no_grad."""
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(5, 4, **F64)
    assert gradpen.r1_penalty(critic, x, backend="fd").dtype == torch.float64
    want = gradpen.gradient_norms(critic, x, create_graph=False)
    with torch.no_grad():
        got = gradpen.gradient_norms(critic, x, backend="fd", create_graph=False)
    assert torch.equal(got, want) and not got.requires_grad


# --------------------------------------------------------------------------- where the double backward cannot run


class _SmoothAttention(nn.Module):
    """Self-attention + LayerNorm + GELU MLP over (N, L, E), mean-pooled; ``pin`` forces the CPU flash kernel."""

    def __init__(self, e=16, heads=2, pin=False):
        super().__init__()
        self.heads, self.pin = heads, pin
        self.norm1, self.norm2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.qkv, self.proj = nn.Linear(e, 3 * e), nn.Linear(e, e)
        self.mlp = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, e))
        self.head = nn.Linear(e, 1)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        if self.pin:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1)).squeeze(1)


@pytest.mark.parametrize("kind", ["wgan-gp", "r1"])
def test_fused_attention_critic_equals_exact_on_math(kind):
    """A critic that pins SDPA's (CPU) flash kernel inside its forward: the exact backends cannot run it (no
    double backward), fd runs it and equals the exact penalty of the same weights on the MATH kernel."""
    torch.manual_seed(6)
    pinned, free = _SmoothAttention(pin=True), _SmoothAttention(pin=False)
    free.load_state_dict(pinned.state_dict())
    real, fake = torch.randn(8, 12, 16), torch.randn(8, 12, 16)
    with pytest.raises((gradpen.UnsupportedCriticError, RuntimeError)):
        _run(pinned, lambda: KINDS[kind](pinned, real, fake, "autograd"))
    got = _run(pinned, lambda: KINDS[kind](pinned, real, fake, "fd"))
    want = _run(free, lambda: KINDS[kind](free, real, fake, "autograd"))  # MATH kernel, same points
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    assert _rel(got[2], want[2]) <= 2e-3


class _SmoothStep(torch.autograd.Function):
    """softplus with a hand-written backward marked @once_differentiable."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def test_once_differentiable_op_equals_its_plain_twin():
    """A critic with a @once_differentiable op: the exact backend refuses it, fd equals the exact penalty of the
    same critic with the plain op (float64)."""
    torch.manual_seed(7)
    lin1, lin2 = nn.Linear(6, 16).double(), nn.Linear(16, 1).double()
    custom = lambda x: lin2(_SmoothStep.apply(lin1(x)))
    plain = lambda x: lin2(F.softplus(lin1(x)))
    params = nn.ModuleList([lin1, lin2])
    x = torch.randn(10, 6, **F64)
    with pytest.raises(gradpen.UnsupportedCriticError, match="once_differentiable"):
        gradpen.r1_penalty(custom, x)
    got = _run(params, lambda: gradpen.r1_penalty(custom, x, backend="fd", return_norms=True))
    want = _run(params, lambda: gradpen.r1_penalty(plain, x, return_norms=True))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    assert _rel(got[2], want[2]) <= 1e-6


@pytest.mark.slow
def test_compiled_critic_equals_eager():
    """fd with a torch.compile'd critic module equals fd with the eager one (float32 rounding)."""
    torch.manual_seed(8)
    critic = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 1))
    real, fake = torch.randn(16, 8), torch.randn(16, 8)
    want = _run(critic, lambda: KINDS["wgan-gp"](critic, real, fake, "fd"))
    compiled = torch.compile(critic)
    got = _run(critic, lambda: KINDS["wgan-gp"](compiled, real, fake, "fd"))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    assert _rel(got[2], want[2]) <= 1e-4


# --------------------------------------------------------------------------- the same critic in every forward


class _DropoutCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 64), nn.SiLU(), nn.Dropout(0.3), nn.Linear(64, 1))

    def forward(self, x):
        return self.body(x).squeeze(1)


def test_dropout_masks_are_shared_by_every_forward(monkeypatch):
    """Dropout in training mode: fd's three forwards (at x, x + hu, x - hu) draw the mask of the exact
    penalty's one forward from the same RNG state, so fd equals the exact penalty; with the RNG not replayed
    between them (Replay.rewind disabled) the gradient is wrong, so this test can fail."""
    torch.manual_seed(9)
    critic = _DropoutCritic().double()
    real, fake = torch.randn(16, 6, **F64), torch.randn(16, 6, **F64)
    want = _run(critic, lambda: KINDS["r1"](critic, real, fake, "autograd"), seed=11)
    got = _run(critic, lambda: KINDS["r1"](critic, real, fake, "fd"), seed=11)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    assert _rel(got[2], want[2]) <= 1e-6
    torch.manual_seed(11)
    critic(real)  # one forward: where the RNG must be left
    after_one = torch.get_rng_state()
    torch.manual_seed(11)
    KINDS["r1"](critic, real, fake, "fd")
    assert torch.equal(torch.get_rng_state(), after_one)

    import gradpen._forwards as forwards

    monkeypatch.setattr(forwards.Replay, "rewind", lambda self: None)
    broken = _run(critic, lambda: KINDS["r1"](critic, real, fake, "fd"), seed=11)
    assert _rel(broken[2], want[2]) > 1e-2


@pytest.mark.parametrize("style", ["old", "parametrization"])
def test_spectral_norm_critic_sees_the_same_weights_in_every_forward(style):
    """Spectral normalisation in training mode updates u (and v) in every forward: fd's forwards all see the
    critic of the first one, so fd equals the exact penalty from the same state, and the buffers afterwards
    equal those one forward leaves."""
    torch.manual_seed(12)
    sn = torch.nn.utils.spectral_norm if style == "old" else torch.nn.utils.parametrizations.spectral_norm
    critic = nn.Sequential(sn(nn.Linear(6, 32)), nn.SiLU(), sn(nn.Linear(32, 1))).double()
    x = torch.randn(16, 6, **F64)
    start = {k: v.clone() for k, v in critic.state_dict().items()}

    def from_start(backend):
        critic.load_state_dict(start)
        out = _run(critic, lambda: gradpen.r1_penalty(critic, x, backend=backend, return_norms=True))
        return out, {k: v.clone() for k, v in critic.named_buffers()}

    (want, after_exact) = from_start("autograd")
    (got, after_fd) = from_start("fd")
    critic.load_state_dict(start)
    critic(x)
    after_one = dict(critic.named_buffers())
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    assert _rel(got[2], want[2]) <= 1e-6
    for name, value in after_one.items():
        assert torch.equal(after_fd[name], value), name
        assert torch.equal(after_exact[name], value), name


def test_batchnorm_and_batch_coupled_critics_are_refused():
    """BatchNorm in training mode keeps its message; a minibatch-std critic (found by behaviour) is refused;
    a per-sample critic is not."""
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Linear(8, 1))
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        gradpen.r1_penalty(bn, x, backend="fd")

    class MinibatchStd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 8), nn.Linear(9, 1)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            std = h.std(0).mean().expand(x.shape[0], 1)
            return self.head(torch.cat([h, std], 1))

    with pytest.raises(ValueError, match="couples the samples"):
        gradpen.r1_penalty(MinibatchStd(), x, backend="fd")
    gradpen.r1_penalty(nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1)), x, backend="fd")


# --------------------------------------------------------------------------- kinks


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1)),
        lambda: nn.Sequential(nn.Linear(6, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1)),
        lambda: nn.Sequential(
            nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 4, 3), nn.Tanh(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(8, 1)
        ),
        lambda: nn.Sequential(nn.Linear(6, 32), nn.ELU(alpha=0.5), nn.Linear(32, 1)),
    ],
    ids=["relu", "leaky_relu", "maxpool", "elu_alpha_0.5"],
)
def test_visible_kinked_layers_are_refused_with_the_alternatives(make):
    """A critic with a piecewise-linear layer is refused before any work, naming the layer and the alternatives;
    allow_kinks=True accepts it."""
    critic, x = make(), torch.randn(8, 6)
    with pytest.raises(gradpen.UnsupportedCriticError, match=r"piecewise-linear.*Instead: backend='autograd'"):
        gradpen.r1_penalty(critic, x, backend="fd")
    gradpen.r1_penalty(critic, x, backend=gradpen.FiniteDifference(allow_kinks=True)).backward()


def _hidden_relu(m, x):
    return m[1](F.relu(m[0](x)))


def _hidden_maximum(m, x):
    h = m[0](x)
    return m[1](torch.maximum(h, 0.1 * h))


def _hidden_max_pool(m, x):
    return m[1](F.max_pool1d(m[0](x)[:, None], 2)[:, 0])


@pytest.mark.parametrize(
    ("forward", "width"), [(_hidden_relu, 64), (_hidden_maximum, 64), (_hidden_max_pool, 32)], ids=lambda f: str(f)
)
def test_hidden_kinks_are_found_by_the_probe(forward, width):
    """Kinks that no module shows (F.relu, torch.maximum, F.max_pool1d in a function) are found by the
    once-per-critic probe and refused; the same function with SiLU is accepted."""
    torch.manual_seed(13)
    critic = functools.partial(forward, nn.ModuleList([nn.Linear(6, 64), nn.Linear(width, 1)]))
    x = torch.randn(16, 6)
    with pytest.raises(gradpen.UnsupportedCriticError, match="jumps along the finite-difference step"):
        gradpen.r1_penalty(critic, x, backend="fd")
    smooth = functools.partial(lambda m, x: m[1](F.silu(m[0](x))), nn.ModuleList([nn.Linear(6, 64), nn.Linear(64, 1)]))
    gradpen.r1_penalty(smooth, x, backend="fd").backward()


def test_kink_probe_leaves_no_trace():
    """The probe's forwards restore the RNG and the buffers: the first fd call on a new dropout critic leaves
    the RNG where one forward would, and gives the same result as a second call."""
    torch.manual_seed(14)
    critic = _DropoutCritic()
    x = torch.randn(8, 6)
    torch.manual_seed(15)
    critic(x)
    after_one = torch.get_rng_state()
    torch.manual_seed(15)
    first = gradpen.r1_penalty(critic, x, backend="fd")
    assert torch.equal(torch.get_rng_state(), after_one)
    torch.manual_seed(15)
    assert torch.equal(gradpen.r1_penalty(critic, x, backend="fd"), first)


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("scale", [1.0, 2.0**10, 2.0**16])
def test_fp16_autocast_with_gradscaler(scale):
    """fp16 autocast with a GradScaler at the scales it settles at: float32 penalty and norms equal to the
    float32 penalty up to fp16 rounding, finite scaled gradients whose unscaled value is within 5 % of the
    float32 gradient."""
    torch.manual_seed(16)
    critic = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    real, fake, alpha = torch.randn(16, 16), torch.randn(16, 16), torch.rand(16)
    want = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend="fd")
    (want_grad,) = torch.autograd.grad(want, critic[0].weight)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    with torch.autocast("cpu", dtype=torch.float16):
        gp, norms = gradpen.gradient_penalty(
            critic, real, fake, alpha=alpha, scaler=scaler, backend="fd", return_norms=True
        )
    assert gp.dtype == norms.dtype == torch.float32
    torch.testing.assert_close(gp, want, rtol=2e-2, atol=1e-3)
    (grad,) = torch.autograd.grad(scaler.scale(gp), critic[0].weight)
    assert torch.isfinite(grad).all()
    assert _rel(grad / scale, want_grad) <= 5e-2


def test_fp16_overflow_is_skipped_by_the_gradscaler_which_settles():
    """At a scale too large for fp16 (2^24: the outer gradient into the fp16 outputs overflows, as it does for
    a plain loss), the value stays finite, the GradScaler sees the overflow, skips the step and halves its
    scale; within a few steps it settles at a scale whose steps are finite and applied."""
    torch.manual_seed(16)
    critic = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(critic.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    real, fake = torch.randn(16, 16), torch.randn(16, 16)
    applied = []
    for _ in range(12):
        before = critic[0].weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.float16):
            gp = gradpen.gradient_penalty(critic, real, fake, scaler=scaler, backend="fd")
        assert torch.isfinite(gp)
        opt.zero_grad()
        scaler.scale(gp).backward()
        scaler.step(opt)
        scaler.update()
        applied.append(not torch.equal(critic[0].weight, before))
        assert torch.isfinite(critic[0].weight).all()
    assert not applied[0] and scaler.get_scale() < 2.0**24  # the overflowing first step was skipped
    assert all(applied[-3:])  # settled: the last steps were applied


def test_bf16_autocast():
    """bf16 autocast: float32 penalty, within bf16 rounding of float32, gradient within 5 % (the default bf16
    step is 0.99 RMS: a wide difference, still close for a smooth critic)."""
    torch.manual_seed(17)
    critic = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 1))
    x = torch.randn(32, 16)
    want = _run(critic, lambda: gradpen.r1_penalty(critic, x, return_norms=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(critic, lambda: gradpen.r1_penalty(critic, x, backend="fd", return_norms=True))
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=3e-2, atol=1e-3)
    assert _rel(got[2], want[2]) <= 5e-2


# --------------------------------------------------------------------------- from the loss's forward, module, errors


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_gradient_norms_from_with_the_critic(scheme):
    """R1 from the loss's own forward with backend='fd' and the critic: the value of the exact R1, the
    parameter gradient of loss + R1 within 1e-6 of the double backward's (float64)."""
    torch.manual_seed(18)
    critic = nn.Sequential(nn.Linear(5, 32), nn.Softplus(), nn.Linear(32, 1)).double()
    real = torch.randn(12, 5, **F64)
    results = []
    for backend in ("autograd", gradpen.FiniteDifference(scheme=scheme)):
        x = real.detach().requires_grad_(True)
        d_real = critic(x)
        r1 = gradpen.gradient_norms_from(d_real, x, critic=critic, backend=backend).square().mean()
        (F.softplus(-d_real).mean() + 5.0 * r1).backward()
        results.append((r1.detach(), _grad_vector(critic)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0)
    assert _rel(results[1][1], results[0][1]) <= 1e-6


def test_gradient_norms_from_fd_refuses_what_it_cannot_replay():
    """The loss's forward cannot be replayed: a dropout critic or a spectral-norm critic in training mode is
    refused with the alternative; fd without the critic, and func, are refused too."""
    x = torch.randn(8, 6, requires_grad=True)
    dropout = _DropoutCritic()
    with pytest.raises(gradpen.UnsupportedCriticError, match=r"random numbers.*r1_penalty"):
        gradpen.gradient_norms_from(dropout(x), x, critic=dropout, backend="fd")
    sn = nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(6, 8)), nn.SiLU(), nn.Linear(8, 1))
    with pytest.raises(gradpen.UnsupportedCriticError, match="writes buffers"):
        gradpen.gradient_norms_from(sn(x), x, critic=sn, backend="fd")
    smooth = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="needs the `critic`"):
        gradpen.gradient_norms_from(smooth(x), x, backend="fd")
    with pytest.raises(ValueError, match="backend='autograd' or 'fd'"):
        gradpen.gradient_norms_from(smooth(x), x, critic=smooth, backend="func")


def test_module_with_fd_and_lazy_regularisation():
    """GradientPenalty(backend='fd', every=2) gives 2 * weight * the fd penalty on every other call."""
    torch.manual_seed(19)
    critic = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1)).double()
    real, fake, alpha = torch.randn(6, 4, **F64), torch.randn(6, 4, **F64), torch.rand(6, **F64)
    gp = gradpen.GradientPenalty(10.0, backend="fd", every=2)
    assert "backend='fd'" in repr(gp)
    first = gp(critic, real, fake, alpha=alpha)
    skipped = gp(critic, real, fake, alpha=alpha)
    want = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend="fd")
    torch.testing.assert_close(first, 20.0 * want, rtol=1e-12, atol=0)
    assert skipped.item() == 0.0
    assert gradpen.GradientPenalty(backend=gradpen.FiniteDifference(scheme="forward")).backend.scheme == "forward"


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: gradpen.FiniteDifference(step=0.0), ValueError, r"`step` must be > 0, got 0"),
        (lambda: gradpen.FiniteDifference(step=2.0), ValueError, r"`step` .* must be in \(0, 1\], got 2"),
        (lambda: gradpen.FiniteDifference(step="1e-3"), TypeError, "`step` must be a real number, got str"),
        (
            lambda: gradpen.FiniteDifference(scheme="backward"),
            ValueError,
            r"Unknown scheme 'backward'. Expected one of \['central', 'forward'\]",
        ),
        (lambda: gradpen.FiniteDifference(allow_kinks=1), TypeError, "`allow_kinks` must be a bool, got int"),
        (
            lambda: gradpen.r1_penalty(nn.Linear(2, 1), torch.randn(2, 2), backend="FD"),
            ValueError,
            r"Unknown backend 'FD'. Expected one of \['autograd', 'fd', 'func'\], or a gradpen.FiniteDifference",
        ),
        (lambda: gradpen.GradientPenalty(backend=3), ValueError, r"Unknown backend 3 \(int\)"),
    ],
)
def test_errors(make, error, match):
    """Bad settings raise ValueError/TypeError naming the argument, what was expected and what was got."""
    with pytest.raises(error, match=match):
        make()
