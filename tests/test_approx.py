"""The finite-difference estimators (gradpen._approx) against closed forms, the exact penalties and a
hand-written reference with the same eps.

Statistical tolerances. A test that compares a Monte-Carlo mean with its expectation computes the
mean of M independent per-sample estimates and their standard error SE = s / sqrt(M) (s: the sample
standard deviation), and accepts |mean - expectation| <= Z * SE + (a deterministic bias bound, where
there is one). By the central limit theorem (M >= 200 here, and the estimates have finite fourth
moments: they are squares of Gaussian polynomials), the probability that a correct estimator fails
one comparison is P(|N(0, 1)| > Z): 6.8e-6 for Z = 4.5 and 3.8e-8 for Z = 5.5. With k comparisons in
one test the union bound gives k times that; each test says its k. All randomness comes from seeded
generators, so every run draws the same numbers: the bound says how unlikely a seed that fails a
correct estimator is, not how often the test flakes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gradpen

Z = 4.5


def _smooth_critic(d: int = 5, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Softplus(), nn.Linear(width, 1))


def _mean_and_se(est: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and standard error of ``est`` ``(m * N,)`` made from ``x.repeat(m, 1)``."""
    est = est.detach().view(m, -1)
    return est.mean(0), est.std(0) / math.sqrt(m)


def _grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("sigma", [1e-3, 1.0, 100.0])
def test_linear_critic_mean_is_w_squared(scheme, sigma):
    """Linear critic: q = w . eps exactly, so the mean estimate is ||w||^2 at any sigma (k = 1, Z = 4.5)."""
    critic = nn.Linear(4, 1).double()
    m = 4000
    x = torch.randn(m, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    est = gradpen.approx_r1_penalty(critic, x, sigma=sigma, scheme=scheme, generator=g, reduction="none")
    mean, se = est.detach().mean(), est.detach().std() / math.sqrt(m)
    want = critic.weight.detach().square().sum()
    assert abs(mean - want) <= Z * se


def _cubic(c1: float, c2: float, c3: float):
    return lambda x: (c1 * x + c2 * x**2 + c3 * x**3).squeeze(1)


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("sigma", [0.2, 0.4])
def test_cubic_critic_mean_matches_the_bias_closed_form(scheme, sigma):
    """Cubic p in 1-D: E[q^2] = p'^2 + s^2 (3 p''^2 / 4 + p' p''') + 15 s^4 p'''^2 / 36 (forward) and
    p'^2 + s^2 p' p''' + 15 s^4 p'''^2 / 36 (central): the bias is O(sigma^2) for both schemes (odd moments
    of eps vanish), the forward one with the extra Hessian term; the mean matches (k = 1, Z = 4.5)."""
    c1, c2, c3, x0 = 0.5, 1.0, 0.7, 0.3
    d1, d2, d3 = c1 + 2 * c2 * x0 + 3 * c3 * x0**2, 2 * c2 + 6 * c3 * x0, 6 * c3
    hessian = 0.75 * d2**2 if scheme == "forward" else 0.0
    want = d1**2 + sigma**2 * (hessian + d1 * d3) + 15 * sigma**4 * d3**2 / 36
    m = 200_000
    x = torch.full((m, 1), x0, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    est = gradpen.approx_r1_penalty(_cubic(c1, c2, c3), x, sigma=sigma, scheme=scheme, generator=g, reduction="none")
    mean, se = est.mean(), est.std() / math.sqrt(m)
    assert abs(mean - want) <= Z * se
    assert abs(want - d1**2) > 2 * Z * se  # the bias is resolved at this sigma, not hidden in the noise


# ----------------------------------------------------------------------------- against the exact twins


def _twins(critic, x, y, alpha):
    """(name, exact per-sample penalty, approx function of (inputs repeated m times, **options))."""
    return [
        ("r1", gradpen.r1_penalty(critic, x, reduction="none"),
         lambda m, **kw: gradpen.approx_r1_penalty(critic, x.repeat(m, 1), reduction="none", **kw)),
        ("r2", gradpen.r2_penalty(critic, y, reduction="none"),
         lambda m, **kw: gradpen.approx_r2_penalty(critic, y.repeat(m, 1), reduction="none", **kw)),
        ("zc", gradpen.gradient_penalty(critic, x, y, center=0.0, alpha=alpha, reduction="none"),
         lambda m, **kw: gradpen.approx_gradient_penalty(
             critic, x.repeat(m, 1), y.repeat(m, 1), alpha=alpha.repeat(m), reduction="none", **kw)),
    ]  # fmt: skip


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_unbiased_against_exact_twins_on_smooth_critic(scheme):
    """Smooth float64 MLP, sigma = 1e-3: the mean of 20000 estimates per sample equals the exact twin's value
    (R1, R2, zero-centred GP) within Z * SE plus a bias bound of 1e-4 relative (the O(sigma^2) bias is
    ~1e-6 relative here); k = 3 penalties x 8 samples = 24 comparisons, Z = 4.5."""
    critic = _smooth_critic().double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    alpha = torch.rand(8, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    m = 20_000
    for name, exact, approx in _twins(critic, x, y, alpha):
        mean, se = _mean_and_se(approx(m, sigma=1e-3, scheme=scheme, generator=g), m)
        exact = exact.detach()
        assert torch.all((mean - exact).abs() <= Z * se + 1e-4 * exact), name


def test_parameter_gradient_averages_to_the_exact_one():
    """The R1 parameter gradient, averaged over 200 independent calls (one draw each), equals the exact R1
    gradient per coordinate within 5.5 SE (401 coordinates: union bound 1.5e-5); then cosine > 0.99 and
    norm ratio within 5%, given that the summed SE is below 3% of the exact norm (checked)."""
    critic = _smooth_critic().double()
    x = torch.randn(8, 5, dtype=torch.float64)
    gradpen.r1_penalty(critic, x).backward()
    exact = _grads(critic)
    g = torch.Generator().manual_seed(4)
    calls = []
    for _ in range(200):
        critic.zero_grad(set_to_none=True)
        gradpen.approx_r1_penalty(critic, x.repeat(16, 1), generator=g).backward()
        calls.append(_grads(critic))
    calls = torch.stack(calls)
    mean, se = calls.mean(0), calls.std(0) / math.sqrt(len(calls))
    assert torch.all((mean - exact).abs() <= 5.5 * se + 1e-12)
    assert se.norm() < 0.03 * exact.norm()
    assert F.cosine_similarity(mean, exact, dim=0) > 0.99
    assert abs(mean.norm() / exact.norm() - 1) < 0.05


def test_cosine_with_exact_gradient_grows_with_draws():
    """One call's parameter gradient agrees better with the exact R1 gradient with more draws: the mean
    cosine over 30 calls rises from draws=1 to 4 to 16 (the per-draw noise averages out)."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    gradpen.r1_penalty(critic, x).backward()
    exact = _grads(critic)
    g = torch.Generator().manual_seed(5)
    cosines = []
    for draws in (1, 4, 16):
        c = []
        for _ in range(30):
            critic.zero_grad(set_to_none=True)
            gradpen.approx_r1_penalty(critic, x, draws=draws, generator=g).backward()
            c.append(F.cosine_similarity(_grads(critic), exact, dim=0))
        cosines.append(torch.stack(c).mean())
    assert cosines[0] < cosines[1] < cosines[2]


# ----------------------------------------------------------------------------- exact formula, same eps


class _Conditional(nn.Module):
    """Two inputs, per-sample labels, a shared table; returns a per-sample map (N, 4), summed per sample."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.emb = nn.Linear(3, 4), nn.Linear(2, 4), nn.Embedding(5, 4)

    def forward(self, a, b, y, table):
        return torch.tanh(self.a(a) + self.b(b) + self.emb(y) + table.sum(0))


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("path", ["fused", "separate"])
def test_matches_hand_written_formula_with_the_same_eps(scheme, path):
    """Multi-input critic with per-sample and shared arguments: the estimate equals the formula written out
    with the same eps (drawn per draw, per input, from the same generator), fused or one forward per point."""
    torch.manual_seed(0)
    module = _Conditional().double()
    critic = module if path == "fused" else (lambda *args: module(*args))  # a lambda hides its modules
    n, sigma, draws = 6, 0.1, 3
    a, b = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    y, table = torch.randint(0, 5, (n,)), torch.randn(n, 4, dtype=torch.float64)
    got = gradpen.approx_r1_penalty(
        critic, (a, b), sigma=sigma, draws=draws, scheme=scheme, generator=torch.Generator().manual_seed(6),
        critic_args=(y, gradpen.shared(table)), reduction="none",
    )  # fmt: skip
    g = torch.Generator().manual_seed(6)
    score = lambda a_, b_: module(a_, b_, y, table).sum(1)
    qs = []
    for _ in range(draws):
        ea, eb = torch.randn(a.shape, generator=g, dtype=a.dtype), torch.randn(b.shape, generator=g, dtype=b.dtype)
        if scheme == "forward":
            qs.append((score(a + sigma * ea, b + sigma * eb) - score(a, b)) / sigma)
        else:
            qs.append((score(a + sigma * ea, b + sigma * eb) - score(a - sigma * ea, b - sigma * eb)) / (2 * sigma))
    torch.testing.assert_close(got, torch.stack(qs).square().mean(0), rtol=1e-9, atol=1e-12)


def test_generator_makes_alpha_and_eps_reproducible():
    """Equal generator seeds give equal estimates (alpha and eps), and another seed gives another one."""
    critic = _smooth_critic()
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    run = lambda s: gradpen.approx_gradient_penalty(critic, x, y, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_return_norms_are_detached_square_roots():
    """return_norms gives sqrt(per-sample estimate), shape (N,), detached."""
    critic = _smooth_critic()
    x = torch.randn(8, 5)
    est, norms = gradpen.approx_r1_penalty(
        critic, x, generator=torch.Generator().manual_seed(9), reduction="none", return_norms=True
    )
    assert norms.shape == (8,) and not norms.requires_grad
    torch.testing.assert_close(norms, est.detach().sqrt())


# ----------------------------------------------------------------------------- randomness and fusion


class _FunctionalDropout(nn.Module):
    """Dropout through F.dropout, invisible to the module-type check: caught by the RNG check."""

    def __init__(self, d: int, p: float):
        super().__init__()
        self.lin, self.p = nn.Linear(d, 1), p

    def forward(self, x):
        return self.lin(F.dropout(x, self.p, self.training))


def _dropout_critics(d, p):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Dropout(p), nn.Linear(d, 1)).double()
    fun = _FunctionalDropout(d, p).double()
    return {"nn.Dropout": (seq, seq[1]), "lambda": (lambda x: seq(x), seq[1]), "F.dropout": (fun, fun.lin)}


@pytest.mark.parametrize("kind", ["nn.Dropout", "lambda", "F.dropout"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_dropout_branches_share_masks(kind, scheme):
    """Linear critic after dropout(p): with the same mask m in both branches, q = w . (m * eps) / (1 - p), so
    E[q^2] = ||w||^2 / (1 - p) (k = 1, Z = 4.5). Different masks would add (w . ((m1 - m2) * x)) / sigma,
    about 1e3 times larger at sigma = 1e-3."""
    d, p, m = 6, 0.5, 4000
    critic, lin = _dropout_critics(d, p)[kind]
    x = torch.randn(m, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(10)
    est = gradpen.approx_r1_penalty(critic, x, sigma=1e-3, scheme=scheme, generator=g, reduction="none").detach()
    mean, se = est.mean(), est.std() / math.sqrt(m)
    want = lin.weight.detach().square().sum() / (1 - p)
    assert abs(mean - want) <= Z * se


def test_rng_after_separate_forwards_is_as_after_one_forward():
    """With dropout (one forward per point, each from the same RNG state) the global RNG ends where one
    forward of the critic would leave it, after the eps draws."""
    critic = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 1))
    x = torch.randn(8, 4)
    torch.manual_seed(11)
    gradpen.approx_r1_penalty(critic, x, draws=3)
    after = torch.rand(4)
    torch.manual_seed(11)
    for _ in range(3):
        torch.randn(x.shape)
    critic(x)
    assert torch.equal(after, torch.rand(4))


def _counting(critic: nn.Module) -> list[int]:
    rows: list[int] = []
    critic.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize(
    ("layer", "scheme", "want"),
    [
        (nn.Identity(), "forward", [8 * 4]),  # fused: x and 3 perturbations in one batch
        (nn.Identity(), "central", [8 * 6]),
        (nn.Dropout(0.0), "forward", [8 * 4]),  # p = 0 draws nothing
        (nn.Dropout(0.1), "forward", [8] * 4),  # separate: one forward per point
        (nn.Dropout(0.1), "central", [8] * 6),
        (nn.BatchNorm1d(4), "forward", [8] * 4),  # batch statistics couple the copies
        (nn.RReLU(), "forward", [8] * 4),
    ],
)
def test_fused_only_when_equivalent(layer, scheme, want):
    """One fused forward over all points when the critic has no random or batch-coupled layer, else one
    forward per point (counted with a forward hook)."""
    critic = nn.Sequential(nn.Linear(4, 4), layer, nn.Linear(4, 1))
    rows = _counting(critic)
    gradpen.approx_r1_penalty(critic, torch.randn(8, 4), draws=3, scheme=scheme)
    assert rows == want


def test_eval_mode_dropout_is_fused():
    """Dropout and BatchNorm in eval mode are deterministic and per-sample: one fused forward."""
    critic = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 1)).eval()
    rows = _counting(critic)
    gradpen.approx_r1_penalty(critic, torch.randn(8, 4), draws=2)
    assert rows == [24]


# ----------------------------------------------------------------------------- dtypes and modes


def test_float64_stays_float64_and_low_precision_gives_float32():
    """float64 in, float64 out; a bf16 critic and bf16 autocast give a float32 estimate."""
    critic = _smooth_critic()
    x = torch.randn(8, 5)
    assert gradpen.approx_r1_penalty(critic.double(), x.double()).dtype == torch.float64
    assert gradpen.approx_r1_penalty(critic.float().bfloat16(), x.bfloat16(), sigma=0.1).dtype == torch.float32
    critic.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est = gradpen.approx_r1_penalty(critic, x, sigma=0.1)
    assert est.dtype == torch.float32 and torch.isfinite(est)


def test_differentiable_under_no_grad_refused_under_inference_mode():
    """Under no_grad the estimate still carries a graph; under inference_mode it is refused."""
    critic = _smooth_critic()
    with torch.no_grad():
        est = gradpen.approx_r1_penalty(critic, torch.randn(8, 5))
    assert est.requires_grad
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        gradpen.approx_r1_penalty(critic, torch.randn(8, 5))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma": 0.0}, ValueError, r"`sigma` must be > 0, got 0"),
        ({"sigma": -0.1}, ValueError, r"`sigma` must be > 0"),
        ({"sigma": float("inf")}, ValueError, r"`sigma` must be finite"),
        ({"sigma": float("nan")}, ValueError, r"`sigma` must not be NaN"),
        ({"sigma": "0.1"}, TypeError, r"`sigma` must be a real number, got str"),
        ({"draws": 0}, ValueError, r"`draws` must be >= 1, got 0"),
        ({"draws": 2.0}, TypeError, r"`draws` must be an int, got float"),
        ({"scheme": "backward"}, ValueError, r"Unknown scheme 'backward'. Expected one of \['central', 'forward'\]"),
        ({"reduction": "max"}, ValueError, r"Unknown reduction 'max'"),
        ({"generator": 0}, TypeError, r"`generator` must be a torch.Generator"),
    ],
)
@pytest.mark.parametrize("fn", ["r1", "r2", "gp"])
def test_bad_options_are_refused(fn, kwargs, error, match):
    """Bad sigma, draws, scheme, reduction or generator: an error naming the argument, before any forward."""
    critic = nn.Linear(3, 1)
    rows = _counting(critic)
    x = torch.randn(4, 3)
    call = {
        "r1": lambda: gradpen.approx_r1_penalty(critic, x, **kwargs),
        "r2": lambda: gradpen.approx_r2_penalty(critic, x, **kwargs),
        "gp": lambda: gradpen.approx_gradient_penalty(critic, x, x, **kwargs),
    }[fn]
    with pytest.raises(error, match=match):
        call()
    assert rows == []


def test_bad_critic_output_and_inputs():
    """A critic that reduces over the batch, and mismatched real/fake, get the exact penalties' errors."""
    with pytest.raises(ValueError, match="one score per sample"):
        gradpen.approx_r1_penalty(lambda x: x.sum(), torch.randn(4, 3))
    with pytest.raises(ValueError, match="same shape"):
        gradpen.approx_gradient_penalty(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(5, 3))


# ----------------------------------------------------------------------------- from outputs you already have


@pytest.mark.parametrize("draws", [1, 3])
def test_squared_norms_from_equals_approx_r1_with_the_same_eps(draws):
    """One forward over [fake, real, real + sigma eps_1..K] gives approx_r1_penalty's estimates and parameter
    gradients, with eps drawn the way approx_r1_penalty draws it (per draw, from the same generator)."""
    critic = _smooth_critic().double()
    n, sigma = 7, 0.05
    real, fake = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    want = gradpen.approx_r1_penalty(
        critic, real, sigma=sigma, draws=draws, generator=torch.Generator().manual_seed(3), reduction="none"
    )
    critic.zero_grad()
    want.sum().backward()
    want_grads = _grads(critic)

    g = torch.Generator().manual_seed(3)
    pert = torch.cat([real + sigma * torch.randn(real.shape, generator=g, dtype=real.dtype) for _ in range(draws)])
    out = critic(torch.cat([fake, real, pert]))
    d_real, d_pert = out[n : 2 * n], out[2 * n :]
    got = gradpen.approx_squared_norms_from(d_real, d_pert, sigma=sigma)
    critic.zero_grad()
    got.sum().backward()
    assert got.shape == (n,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grads(critic), want_grads, rtol=1e-9, atol=1e-12)


def test_squared_norms_from_linear_critic_mean_is_w_squared():
    """Linear critic, many draws: the mean estimate is ||w||^2 within Z standard errors (k = 1 comparison;
    the estimates are (w . eps)^2, independent across samples and draws)."""
    w = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    critic = lambda x: x @ w.T
    g = torch.Generator().manual_seed(0)
    n, k, sigma = 400, 5, 0.3
    x = torch.randn(n, 3, dtype=torch.float64, generator=g)
    pert = x.repeat(k, 1) + sigma * torch.randn(k * n, 3, dtype=torch.float64, generator=g)
    per_draw = ((critic(pert).view(k, n) - critic(x).view(1, n)) / sigma).square().flatten()
    est = gradpen.approx_squared_norms_from(critic(x), critic(pert), sigma=sigma)
    torch.testing.assert_close(est, per_draw.view(k, n).mean(0))
    se = per_draw.std() / math.sqrt(k * n)
    assert abs(est.mean() - w.square().sum()) <= Z * se


def test_squared_norms_from_precision():
    """float64 outputs stay float64; fp16 and bf16 outputs are summed and differenced in float32."""
    for dtype, want in [
        (torch.float64, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ]:
        out = torch.randn(4, 2).to(dtype)
        assert gradpen.approx_squared_norms_from(out, out.repeat(2, 1), sigma=0.1).dtype == want
    # (N, 2) outputs are summed per sample before the difference, in float32: 1024 + 1 is not lost in fp16
    clean = torch.tensor([[1024.0, 0.0]], dtype=torch.float16)
    pert = torch.tensor([[1024.0, 1.0]], dtype=torch.float16)
    assert gradpen.approx_squared_norms_from(clean, pert, sigma=1.0).item() == 1.0


@pytest.mark.parametrize(
    ("outputs", "perturbed", "sigma", "error", "match"),
    [
        (torch.randn(4, 1), torch.randn(6, 1), 0.1, ValueError, r"`perturbed` must stack K >= 1 draws shaped like "
         r"`outputs` \(4, 1\), i.e. \(K\*4, 1\); got \(6, 1\)"),
        (torch.randn(4, 1), torch.randn(8), 0.1, ValueError, r"i.e. \(K\*4, 1\); got \(8,\)"),
        (torch.randn(4, 1), torch.randn(0, 1), 0.1, ValueError, r"got \(0, 1\)"),
        (torch.randn(4), torch.randn(4), 0.0, ValueError, r"`sigma` must be > 0, got 0"),
        (torch.randn(4), torch.randn(4), float("inf"), ValueError, r"`sigma` must be finite"),
        (torch.randn(4), torch.randn(4), "0.1", TypeError, r"`sigma` must be a real number, got str"),
        (torch.randn(4).mean(), torch.randn(4), 0.1, ValueError, r"`outputs` must hold one score per sample"),
        ([1.0], torch.randn(4), 0.1, TypeError, r"`outputs` must be a Tensor, got list"),
        (torch.randn(4), None, 0.1, TypeError, r"`perturbed` must be a Tensor, got NoneType"),
        (torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long), 0.1, TypeError,
         r"`outputs` must be a floating-point tensor, got torch.int64"),
    ],
)  # fmt: skip
def test_squared_norms_from_bad_input(outputs, perturbed, sigma, error, match):
    """Bad shapes, sigma or types: an error naming the argument, what was expected and what was got."""
    with pytest.raises(error, match=match):
        gradpen.approx_squared_norms_from(outputs, perturbed, sigma=sigma)


# ----------------------------------------------------------------------------- where no double backward runs


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))


class _TransformerCritic(nn.Module):
    """Tokens (N, T, 4) -> embedding, pre-norm attention block (default SDPA kernel), mean pool, score."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.emb, self.norm, self.attn, self.head = (
            nn.Linear(4, d),
            nn.LayerNorm(d),
            _Attention(d, heads),
            nn.Linear(d, 1),
        )

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attn(self.norm(h))
        return self.head(h.mean(1)).squeeze(1)


@pytest.mark.slow
def test_transformer_critic_compiled_equals_eager():
    """Transformer critic on the default SDPA kernel: torch.compile(critic, fullgraph=True) gives the eager
    estimate and parameter gradients with the same generator; the whole penalty under
    torch.compile(fullgraph=True) (generator=None, inductor's fallback_random) equals eager from the same seed."""
    torch.manual_seed(0)
    critic, x = _TransformerCritic(), torch.randn(8, 6, 4)

    def step(fn):
        critic.zero_grad(set_to_none=True)
        est = fn()
        est.backward()
        return est.detach(), _grads(critic)

    gen = lambda: torch.Generator().manual_seed(12)
    want, want_g = step(lambda: gradpen.approx_r1_penalty(critic, x, generator=gen()))
    compiled = torch.compile(critic, fullgraph=True)
    got, got_g = step(lambda: gradpen.approx_r1_penalty(compiled, x, generator=gen()))
    assert torch.isfinite(got) and torch.isfinite(got_g).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-5)

    from torch._inductor import config

    from gradpen import _compat

    # Below COMPILE_REGION the penalty runs eagerly inside the compiled function (a graph break).
    fullgraph = _compat.TORCH >= _compat.COMPILE_REGION
    whole = torch.compile(lambda x: gradpen.approx_r1_penalty(critic, x, draws=2), fullgraph=fullgraph)
    with config.patch(fallback_random=True):
        torch.manual_seed(13)
        want, want_g = step(lambda: gradpen.approx_r1_penalty(critic, x, draws=2))
        torch.manual_seed(13)
        got, got_g = step(lambda: whole(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-5)


def _fsdp_critic():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def _fsdp_loss(critic, x, rank):
    g = torch.Generator().manual_seed(100 + rank)  # each rank's eps, reproduced by the reference
    return critic(x).mean() + gradpen.approx_r1_penalty(critic, x, draws=2, generator=g)


def _fsdp_data():
    return torch.randn(16, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _fsdp_worker(rank, world, store_path, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch<2.6: FSDP2 lived in torch.distributed._composable.fsdp
        from torch.distributed._composable.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    critic = _fsdp_critic()
    for layer in critic:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(critic, mesh=mesh)
    _fsdp_loss(critic, _fsdp_data().chunk(world)[rank], rank).backward()
    torch.save([p.grad.full_tensor() for p in critic.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8),
    reason="FSDP2 on the CPU (gloo) fails inside torch 2.6: 'Stream' object has no attribute 'record_event'",
)
def test_fsdp2_gradients_equal_unsharded_reference(tmp_path):
    """FSDP2 (fully_shard per layer, 2 gloo processes, half the batch each): the gathered gradients equal the
    average of unsharded single-process gradients computed with the same eps (float64)."""
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    want = None
    for rank, x in enumerate(_fsdp_data().chunk(2)):
        critic = _fsdp_critic()
        _fsdp_loss(critic, x, rank).backward()
        grads = [p.grad for p in critic.parameters()]
        want = grads if want is None else [(a + b) / 2 for a, b in zip(want, grads, strict=True)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- hardening


@pytest.mark.parametrize(("sigma", "dtype"), [(1e-8, torch.float32), (1e-12, torch.float32), (1e-300, torch.float64)])
def test_sigma_below_the_dtype_resolution_is_refused(sigma, dtype):
    """A sigma below 10 eps x RMS of the inputs (float32 1e-8: 100x the exact R1; 1e-12: exactly 0; 1e-300:
    NaN) is refused, naming the smallest usable sigma; one just above it runs and is finite."""
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    x = torch.randn(16, 4, dtype=dtype)
    with pytest.raises(ValueError, match=r"`sigma`=.* is below the resolution of float.*Use sigma >= "):
        gradpen.approx_r1_penalty(critic, x, sigma=sigma)
    smallest = 10 * torch.finfo(dtype).eps * x.square().mean().sqrt().item()
    assert torch.isfinite(gradpen.approx_r1_penalty(critic, x, sigma=2 * smallest))


def test_sigma_is_checked_against_the_autocast_dtype():
    """Under bf16 autocast the critic computes in bfloat16: sigma = 0.01 on unit-scale inputs is a few bf16 ulps,
    refused; sigma = 0.2 is accepted."""
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="resolution of bfloat16"):
            gradpen.approx_r1_penalty(critic, x, sigma=0.01)
        gradpen.approx_r1_penalty(critic, x, sigma=0.2)


def test_meta_tensors_run_for_shape_dry_runs():
    """approx_* on meta tensors (shape dry runs) give a meta result of the right shape, as the exact penalties do."""
    critic = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Tanh(), nn.Linear(8, 1)).to("meta")
    x = torch.randn(6, 4, device="meta")
    for fn in (gradpen.approx_r1_penalty, gradpen.approx_r2_penalty):
        est = fn(critic, x, reduction="none")
        assert est.device.type == "meta" and est.shape == (6,)


def test_a_list_of_n_labels_takes_the_separate_path():
    """A per-sample list of N labels cannot be tiled with the points: the estimate equals the one with the labels
    as a tensor (which the fused path tiles), with the same eps."""
    lin = nn.Linear(2, 3, bias=False).double()  # a visible module: the tensor labels take the fused path
    critic = lambda x, y: lin(x).tanh()[torch.arange(x.shape[0]), torch.as_tensor(y)]
    x, labels = torch.randn(8, 2, dtype=torch.float64), [0, 1, 2, 0, 1, 2, 0, 1]
    gen = lambda: torch.Generator().manual_seed(0)
    as_list = gradpen.approx_r1_penalty(critic, x, critic_args=(labels,), generator=gen())
    as_tensor = gradpen.approx_r1_penalty(critic, x, critic_args=(torch.tensor(labels),), generator=gen())
    torch.testing.assert_close(as_list, as_tensor, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("outputs", "perturbed", "match"),
    [
        (torch.randn(0, 1), torch.randn(4, 1), r"`outputs` must hold at least one sample, got an empty batch \(0, 1\)"),
        (torch.randn(4), torch.randn(6), r"i\.e\. \(K\*4,\); got \(6,\)"),
    ],
)
def test_squared_norms_from_messages_name_the_right_argument(outputs, perturbed, match):
    """Empty outputs blame `outputs`, not `perturbed`; a 1-D shape is printed as a tuple, (K*4,)."""
    with pytest.raises(ValueError, match=match):
        gradpen.approx_squared_norms_from(outputs, perturbed, sigma=0.1)
