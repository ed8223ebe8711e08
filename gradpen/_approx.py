r"""Double-backward-free penalties: finite-difference estimators of :math:`\lVert \nabla_x D(x) \rVert_2^2`.

An estimator is not a backend: backends return the exact input gradient, the estimators never form
it. They need forwards and the ordinary backward of the loss only, so they run where a double
backward cannot (fused attention kernels, FSDP2, ``torch.compile``, custom ops without a double
backward). Each one estimates the same per-sample quantity as its exact twin, so the twin's weight
carries over unchanged:

==========  ========================================================================  ==================
scheme      per-draw quotient :math:`q`                                               critic evaluations
==========  ========================================================================  ==================
forward     :math:`(D(x + \sigma\varepsilon) - D(x)) / \sigma`                         ``1 + draws``
central     :math:`(D(x + \sigma\varepsilon) - D(x - \sigma\varepsilon)) / (2\sigma)`   ``2 * draws``
==========  ========================================================================  ==================

with :math:`\varepsilon \sim \mathcal N(0, I)` per element and the estimate the mean of :math:`q^2`
over the draws. As :math:`\sigma \to 0`, :math:`q \to \nabla D \cdot \varepsilon`, whose square has
mean :math:`\lVert \nabla D \rVert^2`.

**Fused or separate forwards.** All points (``x`` and its perturbations) must see the same critic:
the same dropout masks, and no mixing between the copies. The critic runs once on the concatenated
batch (one fused forward) when the modules behind it are visible (:func:`gradpen._guards.critic_modules`)
and none of them is random or batch-coupled: no dropout with ``p > 0``, ``nn.MultiheadAttention`` with
dropout or ``nn.RReLU`` in training mode, and no BatchNorm that uses batch statistics. Otherwise (and
for a critic that hides its modules, such as a lambda) each point gets its own forward, and every
forward starts from the same global RNG state (CPU and the inputs' accelerator), so random layers draw
the same masks in every branch; the RNG is left as one forward would leave it. In eager mode, a fused
forward that still drew from the global RNG (a custom layer calling ``F.dropout``) is discarded and
redone as separate forwards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradpen._args import CriticCall, resolve_critic_args
from gradpen._backends import compute_dtype
from gradpen._checks import (
    _type_name,
    as_inputs,
    as_pair,
    check_choice,
    check_critic,
    check_critic_output,
    check_generator,
    check_int,
    check_number,
)
from gradpen._compat import eager_below_compile_region
from gradpen._forwards import Replay, can_fuse
from gradpen._guards import CriticCache
from gradpen._penalty import Critic, Inputs, _check_options, _finish, _grad_mode, _interpolate

# scheme -> (a, b): q = (D(x + a sigma eps) - D(x + b sigma eps)) / ((a - b) sigma)
SCHEMES: dict[str, tuple[float, float]] = {
    "forward": (1.0, 0.0),
    "central": (1.0, -1.0),
}


def _scores(out: Any, rows: int) -> Tensor:
    """Per-sample scores ``(rows,)``: the critic's outputs summed per sample, in float32 or wider."""
    out = check_critic_output(out, rows)
    return out.reshape(rows, -1).sum(1, dtype=torch.promote_types(out.dtype, torch.float32))


def _separate(critic: Critic, call: CriticCall, points: list[tuple[Tensor, ...]], replay: Replay) -> Tensor:
    """One forward per point, each from the RNG state and buffers of the first: the same critic in all."""
    scores = []
    for xs in points:
        replay.rewind()
        scores.append(_scores(call(critic, *xs), xs[0].shape[0]))
        replay.done()
    replay.finish()
    return torch.stack(scores)


def _fused(critic: Critic, call: CriticCall, points: list[tuple[Tensor, ...]]) -> Tensor:
    """One forward over the concatenated points: scores ``(len(points), N)``."""
    k, n = len(points), points[0][0].shape[0]
    stacked = tuple(torch.cat(column) for column in zip(*points, strict=True))
    return _scores(call.tiled(k)(critic, *stacked), k * n).view(k, n)


# The smallest sigma, in units of the compute dtype's eps times the inputs' RMS: below it the rounding of
# x + sigma * eps to the compute dtype changes the perturbation by more than 10 % per element, and the
# quotient measures rounding (float32, sigma 1e-8: 100x the exact R1; 1e-12: exactly 0; 1e-300: NaN).
SIGMA_RESOLUTION = 10.0
_sigma_checked = CriticCache()  # (critic key) -> the compute dtypes whose resolution was checked


def check_sigma(critic: Any, xs: tuple[Tensor, ...], sigma: float) -> None:
    """Refuse a ``sigma`` below the compute dtype's resolution at the inputs' scale. Checked on the first
    call per critic and compute dtype (reading the RMS is a host sync), so a later batch on another scale
    is not checked again.

    Raises:
        ValueError: naming the smallest sigma for these inputs and dtype.
    """
    if torch.compiler.is_compiling() or xs[0].device.type == "meta":
        return
    dtypes = {compute_dtype(x) for x in xs}
    seen = _sigma_checked.get(critic, frozenset())
    if dtypes <= seen:
        return
    wide = functools.reduce(torch.promote_types, (x.dtype for x in xs), torch.float32)
    rms = (sum(x.reshape(x.shape[0], -1).to(wide).square().sum() for x in xs) / sum(x.numel() for x in xs)).sqrt()
    eps = max(torch.finfo(d).eps for d in dtypes)
    smallest = SIGMA_RESOLUTION * eps * max(float(rms), 1e-30)
    if sigma < smallest:
        names = "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(
            f"`sigma`={sigma:g} is below the resolution of {names} at these inputs' scale (RMS {float(rms):.3g}): "
            f"the perturbation x + sigma * eps is rounded by more than 10 % per element and the estimate measures "
            f"rounding. Use sigma >= {smallest:.2g} ({SIGMA_RESOLUTION:g} x eps x RMS), or a wider dtype "
            "(no autocast for the penalty)."
        )
    _sigma_checked.set(critic, frozenset(seen | dtypes))


def _settings(critic: Any, sigma: Any, draws: Any, scheme: Any) -> tuple[float, int]:
    check_critic(critic)
    sigma = check_number(sigma, "sigma", low=0.0, strict=True)
    draws = check_int(draws, "draws", low=1)
    check_choice(scheme, "scheme", SCHEMES)
    return sigma, draws


def _estimate(
    critic: Critic,
    xs: tuple[Tensor, ...],
    sigma: float,
    draws: int,
    scheme: str,
    generator: torch.Generator | None,
    critic_args: Any,
    critic_kwargs: Any,
) -> Tensor:
    """The per-sample estimate ``(N,)`` of the squared input-gradient norm (see the module docstring)."""
    first = xs[0]
    check_generator(generator, first)
    call = resolve_critic_args(critic_args, critic_kwargs, first.shape[0])
    xs = tuple(x.detach() for x in xs)
    check_sigma(critic, xs, sigma)
    extra = {} if generator is None else {"generator": generator}  # see _penalty._rand
    a, b = SCHEMES[scheme]

    points: list[tuple[Tensor, ...]] = []
    base: list[int] = []  # the index of the unperturbed point, shared by all draws

    def at(offset: float, eps: tuple[Tensor, ...]) -> int:
        if offset == 0.0 and base:
            return base[0]
        points.append(xs if offset == 0.0 else tuple(x + (offset * sigma) * e for x, e in zip(xs, eps, strict=True)))
        if offset == 0.0:
            base.append(len(points) - 1)
        return len(points) - 1

    pairs = []
    for _ in range(draws):
        eps = tuple(torch.randn(x.shape, dtype=x.dtype, device=x.device, **extra) for x in xs)
        pairs.append((at(a, eps), at(b, eps)))

    if not can_fuse(critic) or call.sample_lists:  # a list of N labels cannot be tiled with the points
        scores = _separate(critic, call, points, Replay(critic, first.device))
    elif torch.compiler.is_compiling():
        scores = _fused(critic, call, points)
    else:
        replay = Replay(critic, first.device)
        scores = _fused(critic, call, points)
        replay.done()
        if replay.drew_random:  # the critic is random after all: one forward per point
            replay.restore()
            scores = _separate(critic, call, points, Replay(critic, first.device))

    plus, minus = ([pair[i] for pair in pairs] for i in (0, 1))
    q = (scores[plus] - scores[minus]) / ((a - b) * sigma)  # (draws, N)
    return q.square().mean(0)


def _squared_norm(
    critic: Critic,
    x: Inputs,
    name: str,
    sigma: Any,
    draws: Any,
    scheme: Any,
    generator: Any,
    critic_args: Any,
    critic_kwargs: Any,
    reduction: Any,
    return_norms: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    xs = as_inputs(x, name)
    sigma, draws = _settings(critic, sigma, draws, scheme)
    _check_options(reduction, return_norms)
    with _grad_mode(True):
        est = _estimate(critic, xs, sigma, draws, scheme, generator, critic_args, critic_kwargs)
        return _finish(est, est.detach().sqrt(), reduction, return_norms)


def approx_squared_norms_from(outputs: Tensor, perturbed: Tensor, *, sigma: float) -> Tensor:
    r"""Per-sample estimates of :math:`\lVert \nabla_x D(x) \rVert_2^2` from critic outputs you already have.

    .. versionadded:: 0.2

    .. math::
        \widehat{n^2_i} = \frac{1}{K}\sum_{k=1}^{K}
            \Big(\frac{p_{(k-1)N+i} - o_i}{\sigma}\Big)^2

    with :math:`o` = ``outputs`` :math:`= D(x)` and :math:`p` = ``perturbed`` :math:`= D(x + \sigma\varepsilon_k)`,
    :math:`\varepsilon_k \sim \mathcal N(0, I)`, stacked draw by draw (:math:`K N` rows; :math:`K = 1`
    for one draw). It is the forward scheme of :func:`approx_r1_penalty` minus the forward, the
    finite-difference twin of :func:`gradient_norms_from`: one critic call over
    ``[real, fake, real + sigma * eps]`` gives the loss and the R1 estimate together, where
    :func:`approx_r1_penalty` runs a forward of its own. Outputs are summed per sample and differenced
    in float32 or wider; both arguments stay differentiable (no stop-gradient).

    .. warning::
        The estimate is right only if :math:`D(x)` and :math:`D(x + \sigma\varepsilon)` see the same
        critic. In one forward over the stacked rows, dropout draws a different mask per row and
        BatchNorm in training mode mixes the rows, so the quotient measures that noise divided by
        :math:`\sigma`. Nothing here can detect it, because the critic is not seen; use
        :func:`approx_r1_penalty` for such critics (it checks the modules and replays the RNG).

    Args:
        outputs (Tensor): the critic's scores at the clean batch, :math:`(N,)`, :math:`(N, 1)` or
            :math:`(N, \dots)` (summed per sample).
        perturbed (Tensor): the scores at :math:`x + \sigma\varepsilon_k`, :math:`(K N, \dots)`
            with the same trailing shape, draw :math:`k` in rows :math:`(k-1)N` to :math:`kN - 1`.
        sigma (float): the standard deviation :math:`\sigma > 0` the perturbations were drawn with.

    Returns:
        Tensor: the estimates :math:`(N,)`, float32 or wider. ``.mean()`` is the approximate R1
        (or R2, or zero-centred GP, by which batch ``x`` is).

    Raises:
        TypeError: if ``outputs`` or ``perturbed`` is not a floating-point tensor, or ``sigma`` not a number.
        ValueError: if ``sigma`` is not finite and positive, ``outputs`` has no batch dimension, or
            ``perturbed`` is not :math:`K N` rows of the same trailing shape.

    Example::

        >>> critic = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> real, fake, sigma = torch.randn(4096, 2), torch.randn(4096, 2), 0.01
        >>> perturbed = real + sigma * torch.randn_like(real)
        >>> d_real, d_fake, d_pert = critic(torch.cat([real, fake, perturbed])).chunk(3)
        >>> r1 = gradpen.approx_squared_norms_from(d_real, d_pert, sigma=sigma).mean()
        >>> loss_d = d_fake.mean() - d_real.mean() + 5.0 * r1
        >>> abs(r1.item() - 25.0) < 2.0  # ||w||^2 = 25, up to sampling noise
        True
    """
    sigma = check_number(sigma, "sigma", low=0.0, strict=True)
    if not isinstance(outputs, Tensor):
        raise TypeError(f"`outputs` must be a Tensor, got {_type_name(outputs)}.")
    if outputs.ndim == 0:
        raise ValueError("`outputs` must hold one score per sample (N, ...), got a scalar (reduced with .mean()?).")
    n = outputs.shape[0]
    if n == 0:
        raise ValueError(f"`outputs` must hold at least one sample, got an empty batch {tuple(outputs.shape)}.")
    if not isinstance(perturbed, Tensor):
        raise TypeError(f"`perturbed` must be a Tensor, got {_type_name(perturbed)}.")
    rows = perturbed.shape[0] if perturbed.ndim else 0
    if rows == 0 or rows % n or perturbed.shape[1:] != outputs.shape[1:]:
        expected = (f"K*{n}", *map(str, outputs.shape[1:]))
        shape = f"({expected[0]},)" if len(expected) == 1 else f"({', '.join(expected)})"
        raise ValueError(
            f"`perturbed` must stack K >= 1 draws shaped like `outputs` {tuple(outputs.shape)}, i.e. "
            f"{shape}; got {tuple(perturbed.shape)}."
        )
    clean = _scores(check_critic_output(outputs, n, "outputs"), n)
    noisy = _scores(check_critic_output(perturbed, rows, "perturbed"), rows).view(rows // n, n)
    return ((noisy - clean) / sigma).square().mean(0)


@eager_below_compile_region
def approx_r1_penalty(
    critic: Critic,
    real: Inputs,
    *,
    sigma: float = 0.01,
    draws: int = 1,
    scheme: str = "forward",
    generator: torch.Generator | None = None,
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""R1 penalty estimated by finite differences, with no double backward.

    .. versionadded:: 0.2

    .. math::
        \widehat{R}_1 = \mathbb{E}_{x \sim p_r}\Big[\frac{1}{K}\sum_{k=1}^{K}
            \Big(\frac{D(x + \sigma\varepsilon_k) - D(x)}{\sigma}\Big)^2\Big],
        \qquad \varepsilon_k \sim \mathcal N(0, I)

    for ``scheme="forward"``; ``"central"`` uses
    :math:`(D(x + \sigma\varepsilon_k) - D(x - \sigma\varepsilon_k)) / 2\sigma`. Per sample, the
    mean over the draws estimates :math:`\lVert \nabla_x D(x) \rVert_2^2`, the summand of
    :func:`r1_penalty`, so the same weight applies (:math:`\gamma/2`). The estimate is exact in mean
    for a linear critic at any :math:`\sigma`; for a smooth one its bias is :math:`O(\sigma^2)`
    for both schemes (odd moments of :math:`\varepsilon` vanish), with different constants (the
    forward scheme adds a Hessian term); see :doc:`/approx`. Both branches are differentiated (no stop-gradient), so the
    parameter gradient estimates the gradient of the exact R1.

    .. note::
        Every point sees the same critic. The critic runs once over all points concatenated
        when that is equivalent, and once per point from the same RNG state otherwise (dropout,
        batch-coupled layers, a critic whose modules are hidden in a function); see :doc:`/approx`.

    Args:
        critic (Callable): maps a batch :math:`(N, *)` (and ``critic_args``) to scores
            :math:`(N,)`, :math:`(N, 1)` or :math:`(N, \dots)` (summed per sample).
        real (Tensor or tuple of Tensors): real batch, or a tuple for a multi-input critic (all
            inputs are perturbed, so the norm is joint). Treated as a constant.
        sigma (float, optional): standard deviation :math:`\sigma > 0` of the perturbation,
            per element. Default: ``0.01``.
        draws (int, optional): number :math:`K \ge 1` of perturbations per sample. Default: ``1``.
        scheme (str, optional): ``"forward"`` (``1 + draws`` critic evaluations per sample) or
            ``"central"`` (``2 * draws``). Default: ``"forward"``.
        generator (torch.Generator, optional): RNG for :math:`\varepsilon`, on the inputs' device.
        critic_args (tuple, optional): extra positional arguments of the critic, as in
            :func:`r1_penalty`. Default: ``()``.
        critic_kwargs (dict, optional): extra keyword arguments of the critic. Default: ``None``.
        reduction (str, optional): ``"mean"``, ``"sum"`` or ``"none"``. Default: ``"mean"``.
        return_norms (bool, optional): also return :math:`\sqrt{\text{estimate}}` per sample,
            detached (for logging: it is biased low, see :doc:`/approx`). Default: ``False``.

    Returns:
        Tensor or (Tensor, Tensor): the estimate (scalar, or :math:`(N,)` with
        ``reduction="none"``), differentiable with respect to the critic's parameters; with
        ``return_norms=True`` also the norms :math:`(N,)`. Float32 or wider: float64 critics give
        float64, fp16/bf16 outputs are summed and differenced in float32.

    Raises:
        TypeError: if ``real`` is not a floating-point tensor or an option has the wrong type.
        ValueError: if the batch is empty, ``sigma`` is not finite and positive, ``draws < 1``,
            the scheme or reduction is unknown, or the critic's output has no batch dimension.

    Example::

        >>> critic = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> g = torch.Generator().manual_seed(0)
        >>> est = gradpen.approx_r1_penalty(critic, torch.randn(4096, 2), generator=g)
        >>> abs(est.item() - 25.0) < 2.0  # ||w||^2 = 25, up to sampling noise
        True
    """
    return _squared_norm(
        critic, real, "real", sigma, draws, scheme, generator, critic_args, critic_kwargs, reduction, return_norms
    )


@eager_below_compile_region
def approx_r2_penalty(
    critic: Critic,
    fake: Inputs,
    *,
    sigma: float = 0.01,
    draws: int = 1,
    scheme: str = "forward",
    generator: torch.Generator | None = None,
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""R2 penalty on fake samples estimated by finite differences: :func:`approx_r1_penalty` at ``fake``.

    .. versionadded:: 0.2

    .. math::
        \widehat{R}_2 = \mathbb{E}_{x \sim p_g}\Big[\frac{1}{K}\sum_{k=1}^{K}
            \Big(\frac{D(x + \sigma\varepsilon_k) - D(x)}{\sigma}\Big)^2\Big]

    Estimates :func:`r2_penalty`; ``fake`` is treated as a constant (no gradient reaches the
    generator). The arguments are those of :func:`approx_r1_penalty`.

    Returns:
        Tensor or (Tensor, Tensor): as for :func:`approx_r1_penalty`.

    Raises:
        TypeError: if ``fake`` is not a floating-point tensor or an option has the wrong type.
        ValueError: as for :func:`approx_r1_penalty`.

    Example::

        >>> critic = lambda x: x.sum(dim=1)  # gradient (1, 1, 1): q = eps_1 + eps_2 + eps_3
        >>> est = gradpen.approx_r2_penalty(critic, torch.zeros(8192, 3), sigma=0.5)
        >>> abs(est.item() - 3.0) < 0.3  # ||grad||^2 = 3 for any sigma
        True
    """
    return _squared_norm(
        critic, fake, "fake", sigma, draws, scheme, generator, critic_args, critic_kwargs, reduction, return_norms
    )


@eager_below_compile_region
def approx_gradient_penalty(
    critic: Critic,
    real: Inputs,
    fake: Inputs,
    *,
    alpha: Tensor | None = None,
    sigma: float = 0.01,
    draws: int = 1,
    scheme: str = "forward",
    generator: torch.Generator | None = None,
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Zero-centred gradient penalty at interpolates, estimated by finite differences.

    .. versionadded:: 0.2

    .. math::
        \widehat{\mathcal P} = \mathbb{E}_{\hat x}\Big[\frac{1}{K}\sum_{k=1}^{K}
            \Big(\frac{D(\hat x + \sigma\varepsilon_k) - D(\hat x)}{\sigma}\Big)^2\Big],
        \qquad \hat x = \alpha\, x_r + (1-\alpha)\, x_f,\quad \alpha \sim U[0, 1]

    Estimates ``gradient_penalty(critic, real, fake, center=0.0)``: one :math:`\alpha` per sample,
    drawn before :math:`\varepsilon`, both from ``generator`` when given. Only the zero-centred
    penalty is offered; :doc:`/approx` says why.

    Args:
        alpha (Tensor, optional): interpolation weights :math:`(N,)` in :math:`[0, 1]`, used as
            given. Default: drawn from :math:`U[0, 1]`.
        generator (torch.Generator, optional): RNG for :math:`\alpha` and :math:`\varepsilon`, on
            the inputs' device.

    The other arguments are those of :func:`approx_r1_penalty`; ``real`` and ``fake`` are
    constants with the same shapes.

    Returns:
        Tensor or (Tensor, Tensor): as for :func:`approx_r1_penalty`.

    Raises:
        TypeError: if an input is not a floating-point tensor or an option has the wrong type.
        ValueError: if ``real`` and ``fake`` differ in shape, ``alpha`` is not :math:`(N,)` in
            :math:`[0, 1]`, or as for :func:`approx_r1_penalty`.

    Example::

        >>> critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
        >>> real, fake = torch.randn(16, 3, 4), torch.randn(16, 3, 4)
        >>> zc = gradpen.approx_gradient_penalty(critic, real, fake)
        >>> loss_d = critic(fake).mean() - critic(real).mean() + 10 * zc
        >>> loss_d.backward()
    """
    reals, fakes = as_pair(real, fake)
    sigma, draws = _settings(critic, sigma, draws, scheme)
    _check_options(reduction, return_norms)
    x_hat = _interpolate(reals, fakes, alpha, generator)
    with _grad_mode(True):
        est = _estimate(critic, x_hat, sigma, draws, scheme, generator, critic_args, critic_kwargs)
        return _finish(est, est.detach().sqrt(), reduction, return_norms)
