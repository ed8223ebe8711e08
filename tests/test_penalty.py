"""gradient_penalty, gradient_norms and interpolate: values, gradients, semantics, numerics, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradpen
from tests import _reference as ref
from tests._critics import critics

BACKENDS = ["autograd", "func"]
F64 = {"dtype": torch.float64}


def _param_grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def _linear(d, w=None, device="cpu", dtype=torch.float64):
    critic = nn.Sequential(nn.Flatten(), nn.Linear(d, 1)).to(device=device, dtype=dtype)
    if w is not None:
        with torch.no_grad():
            critic[1].weight.copy_(torch.as_tensor(w, dtype=dtype).view(1, d))
    return critic


# --------------------------------------------------------------------------- properties (hypothesis)


@given(spec=critics(), n=st.integers(1, 8))
def test_norms_match_finite_differences(spec, n):
    """Per-sample norms of both backends equal central finite differences of each sample's output."""
    critic, shape = spec
    x = torch.randn(n, *shape, **F64)
    expected = ref.finite_difference_norms(critic, [x])
    for backend in BACKENDS:
        got = gradpen.gradient_norms(critic, x, backend=backend, create_graph=False)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@given(
    spec=critics(),
    n=st.integers(1, 8),
    center=st.floats(0.0, 3.0),
    one_sided=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_backends_match_per_sample_reference(spec, n, center, one_sided, reduction):
    """Both backends equal the one-sample-at-a-time loop on values, norms and the critic's .grad."""
    critic, shape = spec
    real, fake, alpha = torch.randn(n, *shape, **F64), torch.randn(n, *shape, **F64), torch.rand(n, **F64)

    critic.zero_grad()
    per_sample, ref_norms = ref.wgan_gp(critic, [real], [fake], alpha, center, one_sided)
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    expected.sum().backward()
    expected_grads = _param_grads(critic)

    for backend in BACKENDS:
        critic.zero_grad()
        gp, norms = gradpen.gradient_penalty(
            critic, real, fake, center, one_sided, backend=backend, alpha=alpha, reduction=reduction, return_norms=True
        )
        gp.sum().backward()
        torch.testing.assert_close(gp, expected.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norms, ref_norms.detach(), rtol=1e-10, atol=1e-12)
        for got, want in zip(_param_grads(critic), expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@given(spec=critics(), n=st.integers(1, 4), center=st.floats(0.0, 2.0), one_sided=st.booleans())
def test_parameter_gradients_pass_gradcheck(spec, n, center, one_sided):
    """The penalty's double-backward gradient w.r.t. the critic's parameters matches finite differences."""
    critic, shape = spec
    real, fake, alpha = torch.randn(n, *shape, **F64), torch.randn(n, *shape, **F64), torch.rand(n, **F64)
    names = [k for k, _ in critic.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in critic.parameters())

    for backend in BACKENDS:

        def penalty(*ps, backend=backend):
            call = lambda x: torch.func.functional_call(critic, dict(zip(names, ps, strict=True)), (x,))
            return gradpen.gradient_penalty(call, real, fake, center, one_sided, alpha=alpha, backend=backend)

        assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-5, rtol=1e-4)


@given(
    n=st.integers(1, 8),
    d=st.integers(1, 12),
    center=st.floats(0.0, 3.0),
    one_sided=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_linear_critic_closed_form(n, d, center, one_sided, backend):
    """A linear critic has gradient w everywhere, so every sample's penalty is (||w|| - c)^2 (clamped if one-sided)."""
    w = torch.randn(d, **F64)
    critic = _linear(d, w)
    gp, norms = gradpen.gradient_penalty(
        critic,
        torch.randn(n, d, **F64),
        torch.randn(n, d, **F64),
        center,
        one_sided,
        backend=backend,
        reduction="none",
        return_norms=True,
    )
    excess = w.norm() - center
    expected = (max(excess, 0.0) if one_sided else excess) ** 2
    torch.testing.assert_close(norms, w.norm().expand(n))
    torch.testing.assert_close(gp, torch.as_tensor(expected, **F64).expand(n))


@given(n=st.integers(1, 6), c=st.integers(1, 3), hw=st.integers(1, 5), backend=st.sampled_from(BACKENDS))
def test_elementwise_map_critic_closed_form(n, c, hw, backend):
    """D(x) = sin(x) elementwise (a PatchGAN-like map) has per-sample gradient norm sqrt(sum cos^2 x)."""
    x = torch.randn(n, c, hw, hw, **F64)
    norms = gradpen.gradient_norms(torch.sin, x, backend=backend)
    torch.testing.assert_close(norms, x.cos().pow(2).sum((1, 2, 3)).sqrt())


@given(n=st.integers(2, 8), backend=st.sampled_from(BACKENDS))
def test_norm_is_per_sample_not_per_batch_or_pixel(n, backend):
    """Samples with different gradient scales keep their own norms (the common wrong-axes bug would mix them)."""
    x = torch.randn(n, 2, 3, 3, **F64)
    critic = lambda x: 0.5 * x.sum((1, 2, 3)) ** 2  # gradient sum(x_i) * ones: a different scale per sample
    norms = gradpen.gradient_norms(critic, x, backend=backend)
    torch.testing.assert_close(norms, x.sum((1, 2, 3)).abs() * 18**0.5)


# --------------------------------------------------------------------------- semantics


def test_alpha_one_is_real_and_zero_is_fake(device):
    """alpha=1 evaluates the penalty at the real samples and alpha=0 at the fake ones, exactly."""
    real, fake = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    seen = []
    critic = lambda x: (seen.append(x.detach().clone()), x.pow(2).sum(1))[1]
    ones, zeros = torch.ones(4, device=device), torch.zeros(4, device=device)
    gradpen.gradient_penalty(critic, real, fake, alpha=ones)
    gradpen.gradient_penalty(critic, real, fake, alpha=zeros)
    assert torch.equal(seen[0], real)
    assert torch.equal(seen[1], fake)
    assert torch.equal(gradpen.interpolate(real, fake, alpha=ones), real)


def test_same_generator_seed_same_alpha(device):
    """Two generators with the same seed draw the same per-sample alpha; another seed draws another."""
    real, fake = torch.ones(6, 2, 2, device=device), torch.zeros(6, 2, 2, device=device)
    draws = [gradpen.interpolate(real, fake, generator=torch.Generator(device).manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    # one alpha per sample: constant over every non-batch element
    assert torch.equal(draws[0], draws[0][:, :1, :1].expand_as(draws[0]))
    assert draws[0].device.type == device.type


def test_inputs_are_constants():
    """No gradient flows back into real or fake (so none into the generator)."""
    real, z = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    fake = 2 * z  # as if from a generator
    for backend in BACKENDS:
        gp = gradpen.gradient_penalty(
            nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), real, fake, backend=backend
        )
        assert gp.requires_grad
        gp.backward()
        assert real.grad is None
        assert z.grad is None


def test_critic_args_and_kwargs_are_passed_not_differentiated():
    """Labels travel in critic_args/critic_kwargs; the norm is w.r.t. the image only, as in the loop reference."""
    torch.manual_seed(1)
    emb = nn.Embedding(10, 6, dtype=torch.float64)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def critic(x, labels, *, shift):
        return body(x * emb(labels)).squeeze(1) + shift

    x_r, x_f, alpha = torch.randn(7, 6, **F64), torch.randn(7, 6, **F64), torch.rand(7, **F64)
    labels = torch.randint(0, 10, (7,))
    _, want = ref.wgan_gp(lambda x, y: critic(x, y, shift=1.0), [x_r], [x_f], alpha, critic_args=(labels,))
    for backend in BACKENDS:
        _, got = gradpen.gradient_penalty(
            critic,
            x_r,
            x_f,
            alpha=alpha,
            critic_args=(labels,),
            critic_kwargs={"shift": 1.0},
            backend=backend,
            return_norms=True,
        )
        torch.testing.assert_close(got, want.detach())


def test_double_backward_trains_the_critic():
    """gp.backward() reaches every parameter the input gradient depends on (all but the last bias)."""
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    for backend in BACKENDS:
        critic.zero_grad(set_to_none=True)
        gradpen.gradient_penalty(critic, torch.randn(16, 4), torch.randn(16, 4), backend=backend).backward()
        *reached, last_bias = critic.parameters()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reached)
        assert last_bias.grad is None


def test_dropout_is_random_per_sample_under_func():
    """backend='func' runs a dropout critic in train mode with a fresh mask per sample."""
    critic = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.5), nn.Linear(32, 1)).train()
    x = torch.randn(1, 32).expand(16, 32)  # 16 identical samples
    norms = gradpen.gradient_norms(critic, x, backend="func")
    assert torch.isfinite(norms).all()
    assert norms.unique().numel() > 1
    critic.eval()  # without dropout the identical samples have identical norms
    assert gradpen.gradient_norms(critic, x, backend="func").unique().numel() == 1


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("center", [0.0, 1.0, 2.5])
def test_zero_gradient_gives_finite_penalty_and_gradients(backend, center, device):
    """A sample whose input gradient is exactly zero gives center^2 and finite (zero) parameter gradients."""
    critic = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).to(device)
    with torch.no_grad():
        critic[0].bias.fill_(-100.0)  # every ReLU is dead: D is constant, its gradient zero
    real, fake = torch.randn(5, 3, device=device), torch.randn(5, 3, device=device)
    gp, norms = gradpen.gradient_penalty(critic, real, fake, center, backend=backend, return_norms=True)
    gp.backward()
    assert torch.equal(norms, torch.zeros(5, device=device))
    assert gp.item() == center**2
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_stays_float64(backend):
    """float64 inputs and critic give a float64 penalty and norms."""
    gp, norms = gradpen.gradient_penalty(
        _linear(3), torch.randn(2, 3, **F64), torch.randn(2, 3, **F64), backend=backend, return_norms=True
    )
    assert gp.dtype == norms.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradscaler_scale_does_not_leak(backend):
    """With a GradScaler at scale 2^16 the penalty and its parameter gradients equal the unscaled ones."""
    critic = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    real, fake, alpha = torch.randn(8, 6), torch.randn(8, 6), torch.rand(8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    results = []
    for s in (None, scaler):
        critic.zero_grad()
        gp = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, scaler=s, backend=backend)
        gp.backward()
        results.append((gp.detach(), _param_grads(critic)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    torch.testing.assert_close(
        gradpen.gradient_penalty(critic, real, fake, alpha=alpha, scaler=disabled), results[0][0]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_computes_penalty_in_float32(backend):
    """Under bf16 autocast on the CPU the penalty and norms are float32 and close to the fp32 result."""
    torch.manual_seed(3)
    critic = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))  # smooth: no kink flips in bf16
    real, fake, alpha = torch.randn(32, 16), torch.randn(32, 16), torch.rand(32)
    want, want_norms = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend, return_norms=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp, norms = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend, return_norms=True)
    assert gp.dtype == norms.dtype == torch.float32
    torch.testing.assert_close(norms, want_norms, rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(gp, want, rtol=5e-2, atol=1e-3)


# --------------------------------------------------------------------------- BatchNorm


def test_batchnorm_warns_under_autograd():
    """A BatchNorm critic in training mode warns, naming BatchNorm and the fix; in eval mode it does not."""
    critic = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(UserWarning, match=r"BatchNorm.*LayerNorm or GroupNorm"):
        gradpen.gradient_penalty(critic, real, fake)
    critic.eval()
    gradpen.gradient_penalty(critic, real, fake)  # the filterwarnings setting makes this warning an error


def test_batchnorm_raises_under_func():
    """backend='func' rejects BatchNorm in training mode with a clear error."""
    critic = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"backend='func'.*BatchNorm.*\(1\)"):
        gradpen.gradient_penalty(critic, torch.randn(4, 3), torch.randn(4, 3), backend="func")


# --------------------------------------------------------------------------- errors

_X = torch.randn(4, 3)
_CRITIC = nn.Linear(3, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"fake": torch.randn(4, 2)},
            ValueError,
            r"`real` and `fake` must have the same shape, got \(4, 3\) and \(4, 2\)",
        ),
        ({"fake": torch.randn(5, 3)}, ValueError, "same shape"),
        (
            {"real": torch.ones(4, 3, dtype=torch.long), "fake": torch.ones(4, 3, dtype=torch.long)},
            TypeError,
            "`real` must have a floating-point dtype, got torch.int64",
        ),
        ({"real": torch.randn(0, 3), "fake": torch.randn(0, 3)}, ValueError, "`real` must hold at least one sample"),
        ({"real": torch.tensor(1.0), "fake": torch.tensor(1.0)}, ValueError, "batch dimension"),
        ({"real": [1.0], "fake": [1.0]}, TypeError, "`real` must be a Tensor, got float"),
        ({"critic": lambda x: x.sum()}, ValueError, r"one score per sample.*N=4.*scalar"),
        ({"critic": lambda x: x.sum(0)}, ValueError, r"leading dimension N=4.*got shape \(3,\)"),
        ({"critic": "not callable"}, TypeError, "`critic` must be callable"),
        ({"backend": "jax"}, ValueError, r"Unknown backend 'jax'. Expected one of \['autograd', 'fd', 'func'\]"),
        ({"reduction": "max"}, ValueError, r"Unknown reduction 'max'. Expected one of \['mean', 'none', 'sum'\]"),
        ({"center": -1.0}, ValueError, "`center` must be >= 0, got -1"),
        ({"center": "1"}, TypeError, "`center` must be a real number, got str"),
        ({"one_sided": 1}, TypeError, "`one_sided` must be a bool, got int"),
        ({"alpha": torch.rand(4, 1)}, ValueError, r"`alpha` must have shape \(4,\).*got \(4, 1\)"),
        (
            {"alpha": torch.tensor([0.0, 0.5, 1.5, 1.0])},
            ValueError,
            r"`alpha` must lie in \[0, 1\], got values in \[0.0, 1.5\]",
        ),
        ({"alpha": [0.5] * 4}, TypeError, "`alpha` must be a Tensor"),
        ({"generator": 3}, TypeError, "`generator` must be a torch.Generator"),
        ({"critic_args": 3}, TypeError, "`critic_args` must be a tuple"),
        ({"critic_kwargs": [1]}, TypeError, "`critic_kwargs` must be a dict"),
        ({"scaler": 2.0}, TypeError, "`scaler` must be a torch.amp.GradScaler"),
        ({"return_norms": "yes"}, TypeError, "`return_norms` must be a bool"),
    ],
)
def test_bad_input_errors(kwargs, error, match):
    """Bad input raises ValueError/TypeError naming the argument, what was expected and what was got."""
    call = {"critic": _CRITIC, "real": _X, "fake": _X.clone(), **kwargs}
    with pytest.raises(error, match=match):
        gradpen.gradient_penalty(call.pop("critic"), call.pop("real"), call.pop("fake"), **call)


def test_cuda_generator_for_cpu_inputs_is_rejected():
    """A generator on another device than the inputs gets an error that says how to create the right one."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA for a generator on another device")
    with pytest.raises(ValueError, match=r"`generator` must be on the inputs' device \(cpu\)"):
        gradpen.interpolate(_X, _X, generator=torch.Generator("cuda"))


def test_gradient_norms_errors():
    """gradient_norms validates its inputs and options like gradient_penalty does."""
    with pytest.raises(ValueError, match="`inputs` must hold at least one sample"):
        gradpen.gradient_norms(_CRITIC, torch.randn(0, 3))
    with pytest.raises(TypeError, match="`create_graph` must be a bool"):
        gradpen.gradient_norms(_CRITIC, _X, create_graph=None)
    with pytest.raises(TypeError, match="`critic` must return a Tensor, got tuple"):
        gradpen.gradient_norms(lambda x: (x,), _X)


# --------------------------------------------------------------------------- hardening (issue 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 2.0**16, 2.0**24])
def test_fp16_autocast_with_gradscaler_is_finite_and_unscaled(backend, scale):
    """fp16 autocast with a GradScaler at any scale (2^16 is the default) gives the fp32 penalty, in float32."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    real, fake, alpha = torch.randn(8, 16), torch.randn(8, 16), torch.rand(8)
    want = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
    (want_grad,) = torch.autograd.grad(want, critic[0].weight)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    with torch.autocast("cpu", dtype=torch.float16):
        gp = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, scaler=scaler, backend=backend)
    (grad,) = torch.autograd.grad(gp, critic[0].weight)
    assert gp.dtype == torch.float32
    torch.testing.assert_close(gp, want, rtol=5e-3, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_under_no_grad_is_still_differentiable(backend):
    """A penalty computed inside torch.no_grad() still trains the critic, with the same gradients as outside."""
    critic = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    real, fake, alpha = torch.randn(6, 3), torch.randn(6, 3), torch.rand(6)
    want = torch.autograd.grad(
        gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend), critic[0].weight
    )
    with torch.no_grad():
        gp = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
    assert gp.requires_grad
    torch.testing.assert_close(torch.autograd.grad(gp, critic[0].weight), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_logging_norms_work_under_no_grad_and_inference_mode(backend, mode):
    """gradient_norms(create_graph=False) gives the same norms under no_grad and inference_mode as outside."""
    emb, lin = nn.Embedding(4, 3), nn.Linear(3, 1)
    critic = lambda x, y: lin(x * emb(y)).squeeze(1)  # labels are saved for backward by the embedding
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    want = gradpen.gradient_norms(critic, x, critic_args=(y,), backend=backend, create_graph=False)
    with mode():
        x_in, y_in = x.clone(), y.clone()  # tensors made inside the mode, as in a real eval loop
        got = gradpen.gradient_norms(critic, x_in, critic_args=(y_in,), backend=backend, create_graph=False)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiable_penalty_is_refused_under_inference_mode(backend):
    """A penalty (which must be differentiable) under inference_mode raises, pointing to gradient_norms."""
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*create_graph=False"):
        gradpen.gradient_penalty(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 3), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "critic",
    [lambda x: torch.zeros(x.shape[0]), lambda x: x.new_ones(x.shape[0]) * 3.0, nn.Sequential(nn.Linear(3, 1))],
    ids=["zeros", "constant", "linear-ignoring"],
)
def test_critic_that_ignores_its_input_has_zero_norm(backend, critic):
    """A critic whose output does not depend on x has norm 0 on both backends, so the penalty is center^2."""
    if isinstance(critic, nn.Sequential):
        lin = critic[0]
        critic = lambda x, lin=lin: lin(torch.ones_like(x)).squeeze(1)  # uses parameters, not the values of x
    gp, norms = gradpen.gradient_penalty(
        critic, torch.randn(4, 3), torch.randn(4, 3), backend=backend, return_norms=True
    )
    assert torch.equal(norms, torch.zeros(4))
    assert gp.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_input_critic_with_two_dtypes(backend):
    """Inputs of different dtypes (float32 image, float64 condition) in either order: a float64 norm equal
    to the loop reference, one alpha for both."""
    w1, w2 = torch.randn(3, **F64), torch.randn(2, **F64)
    critic = lambda a, b: torch.tanh(a.double() @ w1 + b.double() @ w2)
    for order in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        real = (torch.randn(4, 3, dtype=order[0]), torch.randn(4, 2, dtype=order[1]))
        fake = (torch.randn(4, 3, dtype=order[0]), torch.randn(4, 2, dtype=order[1]))
        alpha = torch.rand(4, **F64)
        _, norms = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend, return_norms=True)
        x_hat = [a.to(torch.float64) for a in gradpen.interpolate(real, fake, alpha=alpha)]
        want = ref.per_sample_norms(critic, x_hat)
        assert norms.dtype == torch.float64
        torch.testing.assert_close(norms, want.detach(), rtol=1e-6, atol=1e-6)


def test_interpolate_detaches_a_given_alpha():
    """interpolate() returns a constant even when the given alpha requires grad."""
    alpha = torch.rand(4, requires_grad=True)
    assert not gradpen.interpolate(torch.randn(4, 3), torch.randn(4, 3), alpha=alpha).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_gradients_give_finite_norms_and_gradients(backend):
    """Gradients of 1e19 per element (a norm of ~5.5e20, representable in float32) give the right norm
    and finite parameter gradients, where a plain float32 sum of squares overflows."""
    critic = nn.Linear(3072, 1, bias=False)
    with torch.no_grad():
        critic.weight.fill_(1e19)
    _, norms = gradpen.r1_penalty(critic, torch.randn(2, 3072), backend=backend, return_norms=True)
    torch.testing.assert_close(norms, torch.full((2,), 1e19 * 3072**0.5))
    (grad,) = torch.autograd.grad(norms.sum(), critic.weight)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, torch.full_like(grad, 2 / 3072**0.5))  # d||w||/dw = w/||w||, per sample


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"center": float("inf")}, "`center` must be finite, got inf"),
        ({"center": float("nan")}, "`center` must not be NaN"),
        ({"alpha": torch.tensor([0.5, 0.5, 0.5, 1 + 1e-12], dtype=torch.float64)}, r"\[0\.5, 1\.000000000001\]"),
    ],
)
def test_non_finite_and_barely_out_of_range_values(kwargs, match):
    """inf and NaN options are refused; an alpha just above 1 is reported with enough digits to see it."""
    with pytest.raises(ValueError, match=match):
        gradpen.gradient_penalty(_CRITIC.double(), _X.double(), _X.double(), **kwargs)


def test_numpy_bools_and_numbers_are_accepted():
    """np.bool_ (what array comparisons give) is a bool and np.float32 a number, not a confusing error."""
    np = pytest.importorskip("numpy")
    critic = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    got = gradpen.gradient_penalty(critic, x, x.clone(), np.float32(0.5), np.bool_(True))
    want = gradpen.gradient_penalty(critic, x, x.clone(), 0.5, True)
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match=r"`one_sided` must be a bool, got numpy\.ndarray"):
        gradpen.gradient_penalty(critic, x, x.clone(), one_sided=np.array([True, False]))


@pytest.mark.parametrize(
    "wrap",
    [lambda m: functools.partial(m), lambda m: m.forward, lambda m: functools.partial(m.forward)],
    ids=["partial", "bound-forward", "partial-of-forward"],
)
def test_batchnorm_is_seen_through_partial_and_bound_methods(wrap):
    """BatchNorm in training mode is found behind functools.partial(D) and D.forward, on both backends."""
    critic = wrap(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(UserWarning, match="BatchNorm"):
        gradpen.gradient_penalty(critic, real, fake)
    with pytest.raises(ValueError, match="backend='func' cannot run a critic with BatchNorm"):
        gradpen.gradient_penalty(critic, real, fake, backend="func")


# --------------------------------------------------------------------------- hardening: seed and norm precision


def test_gradscaler_seed_is_a_power_of_two_so_the_norm_is_unbiased():
    """Under a GradScaler whose scale / N is not a power of two (1000 / 3), an fp16 critic's norm is the unscaled
    one to float32 rounding: the seed is rounded to a power of two, exact in fp16, and divided out as used
    (an unrounded seed of 333.3 rounds to 333.25 in fp16: a 2.5e-4 bias)."""
    critic = nn.Linear(4, 1, bias=False).half()
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.5, -1.0, 0.25, 2.0]]))
    x = torch.randn(3, 4).half()
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
    got = gradpen.gradient_norms(critic, x, scaler=scaler)
    want = torch.tensor([0.5, -1.0, 0.25, 2.0]).norm()
    torch.testing.assert_close(got, want.expand(3), rtol=1e-7, atol=0)


def test_bf16_gradients_are_normed_in_float32():
    """The overflow-safe norm of bfloat16 rows divides in float32: it equals the float32 norm of the same
    bfloat16 values to 1e-6 (a bfloat16 division rounds every element: 2e-3)."""
    from gradpen._penalty import _norm

    rows = (torch.randn(8, 4096) * 3).bfloat16()
    want = rows.float().norm(dim=1)
    torch.testing.assert_close(_norm(rows, torch.float32), want, rtol=1e-6, atol=0)
