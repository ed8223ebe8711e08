r"""The penalties: validate -> sample points -> input gradients -> norm -> shape -> reduce.

Every public function here goes through the same three steps:

1. :func:`_norms_at` asks a backend (:mod:`gradpen._backends`) for the per-sample input gradients
   at some points and turns them into per-sample L2 norms over all non-batch dimensions (jointly
   over all inputs of a multi-input critic), in at least float32, with any GradScaler scale removed;
2. a penalty shapes the norms, :math:`(\lVert g\rVert - c)^2` and friends;
3. :func:`_finish` reduces and optionally returns the norms.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradpen._args import resolve_critic_args
from gradpen._backends import FiniteDifference, resolve_backend
from gradpen._checks import (
    as_inputs,
    as_pair,
    check_alpha,
    check_bool,
    check_choice,
    check_critic,
    check_generator,
    check_number,
    check_scaler,
)
from gradpen._compat import eager_below_compile_region
from gradpen._guards import NO_CONTEXT, grad_enabled

Inputs = Tensor | Sequence[Tensor]
Critic = Callable[..., Tensor]

REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": torch.mean,
    "sum": torch.sum,
    "none": lambda t: t,
}

# The largest seed of the inner backward under a GradScaler. The outer loss is scaled by S, but the
# input gradient is seeded with min(S / N, SEED_CAP) per output element, rounded down to a power of two:
# S itself (2**16 by default) exceeds float16's largest value (65504) and would make every fp16 input
# gradient inf, and a power of two is exact in float16 and bfloat16, so the norm is divided by the very
# seed the backward used.
SEED_CAP = 2.0**10


def _seed(scaler: Any, n: int, like: Tensor) -> Tensor | None:
    """The inner backward's seed for a GradScaler (``None`` without one), as a device tensor: no host sync."""
    check_scaler(scaler)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler.scale(torch.ones((), device=like.device, dtype=torch.float32))
    return torch.exp2(torch.floor(torch.log2((scale / n).clamp(min=2.0**-14, max=SEED_CAP))))


def _inference_mode() -> bool:
    """``torch.is_inference_mode_enabled()``, which torch.compile cannot trace (and compiled code
    does not run under inference_mode)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def _grad_mode(create_graph: bool) -> contextlib.AbstractContextManager[None]:
    """Grad mode for the work of a differentiable result, whatever the caller's mode.

    ``torch.no_grad()`` around a penalty would otherwise return a constant, and the critic would
    train unregularised. ``torch.inference_mode()`` cannot be lifted for tensors made inside it,
    so a differentiable result is refused there.
    """
    if not create_graph:
        return NO_CONTEXT
    if _inference_mode():
        raise RuntimeError(
            "A differentiable gradient penalty cannot be built under torch.inference_mode(): its tensors "
            "can never be part of a graph. Compute the penalty outside inference_mode, or, to log the norms "
            "only, call gradpen.gradient_norms(..., create_graph=False), which works there."
        )
    return grad_enabled()


# Plain float32 norms inside this range lost nothing to overflow or underflow: their squares' sum is far
# from float32's largest value (3.4e38), and elements that matter have squares above its smallest normal.
_SAFE = (1e-15, 1e18)
_WIDE = (torch.float32, torch.float64)  # the dtypes a norm is computed in as they are
_UNSCALED = (torch.float16, torch.float64)  # the dtypes whose squares cannot overflow the norm's sum


def _norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    """L2 norm over dim 1 of ``x`` ``(N, M)`` in ``dtype``, without overflow or NaN.

    float32 and bfloat16 values above about 1e19 have squares that overflow float32; each row is
    divided by its largest magnitude first (the norm is homogeneous, so the result and its gradient
    are unchanged; the divisor is a constant). float16 squares cannot overflow a float32 sum, and
    float64 ones not below 1e154, so those skip the rescaling. On the CPU, where reading a value costs
    no device sync, the plain norm is kept when every row's lies in :data:`_SAFE` (one kernel instead
    of five). At a zero row the norm and its gradient are 0, never NaN (``vector_norm``'s subgradient).
    """
    if x.dtype in _UNSCALED or x.shape[1] == 0:
        return torch.linalg.vector_norm(x, dim=1, dtype=dtype)
    if x.dtype == dtype and x.is_cpu and not torch.compiler.is_compiling():
        plain = torch.linalg.vector_norm(x, dim=1)
        # N floats as a list: cheaper than aminmax and two item() calls. A NaN row can hide from min/max
        # (comparisons with NaN are false), but never another row; either way its norm is NaN.
        values = plain.tolist()
        if _SAFE[0] < min(values) and max(values) < _SAFE[1]:
            return plain
    m = x.detach().abs().amax(dim=1, keepdim=True).to(dtype)
    m = torch.where((m > 0) & m.isfinite(), m, torch.ones_like(m))
    # The division in the norm's dtype: a bfloat16 quotient would round every element (2e-3 relative).
    return torch.linalg.vector_norm(x.to(dtype) / m, dim=1) * m.squeeze(1)


def _grad_norms(grads: tuple[Tensor, ...], seed: Tensor | None) -> Tensor:
    """Per-sample L2 norms ``(N,)`` over all non-batch elements of all ``grads`` together, in float32 or
    wider (the widest of the gradients' dtypes), with the seed divided out."""
    if len(grads) == 1:
        g = grads[0]
        dtype = g.dtype if g.dtype in _WIDE else torch.promote_types(g.dtype, torch.float32)
        norms = _norm(g.reshape(g.shape[0], -1), dtype)
    else:
        dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)
        norms = _norm(torch.stack([_norm(g.reshape(g.shape[0], -1), dtype) for g in grads], 1), dtype)
    # Unscale the norm rather than the gradients: N divisions instead of N * D.
    return norms if seed is None else norms / seed.to(dtype)


def _norms_at(
    critic: Critic,
    inputs: tuple[Tensor, ...],
    backend: str,
    critic_args: Any,
    critic_kwargs: Any,
    scaler: Any,
    create_graph: bool,
) -> Tensor:
    """Per-sample L2 norm of the critic's input gradient at ``inputs``: shape ``(N,)``.

    The norm is over all non-batch dimensions of every input together, computed in float32 or
    wider (float64 stays float64); see :func:`_grad_norms`. With ``create_graph``, the caller runs
    this under :func:`_grad_mode`.
    """
    check_critic(critic)
    grads_of = resolve_backend(backend)
    n = inputs[0].shape[0]
    call = resolve_critic_args(critic_args, critic_kwargs, n)
    seed = None if scaler is None else _seed(scaler, n, inputs[0])
    if not create_graph and _inference_mode():
        # Tensors made under inference_mode cannot be saved for backward: work on normal copies.
        with torch.inference_mode(False):
            inputs = tuple(x.clone() for x in inputs)
            call = call.with_rows(tuple(r.clone() for r in call.rows()))
            return _grad_norms(grads_of(critic, inputs, call, seed, False), seed)
    return _grad_norms(grads_of(critic, inputs, call, seed, create_graph), seed)


def _finish(per_sample: Tensor, norms: Tensor, reduction: str, return_norms: bool) -> Tensor | tuple[Tensor, Tensor]:
    out = REDUCTIONS[reduction](per_sample)
    return (out, norms) if return_norms else out


def _check_options(reduction: Any, return_norms: Any) -> None:
    check_choice(reduction, "reduction", REDUCTIONS)
    check_bool(return_norms, "return_norms")


def _check_shape(center: Any, one_sided: Any, reduction: Any, return_norms: Any) -> float:
    """``center`` (as a float), ``one_sided``, ``reduction`` and ``return_norms`` of a penalty; values of
    the right types and ranges (the defaults among them) take one test."""
    if (
        type(center) is float
        and 0.0 <= center < math.inf  # False for NaN
        and type(one_sided) is bool
        and type(reduction) is str
        and reduction in REDUCTIONS
        and type(return_norms) is bool
    ):
        return center
    center = check_number(center, "center", low=0.0)
    check_bool(one_sided, "one_sided")
    _check_options(reduction, return_norms)
    return center


def _two_sided_or_not(norms: Tensor, center: float, one_sided: bool) -> Tensor:
    excess = norms - center
    return (excess.clamp_min(0) if one_sided else excess).square()


def _pack(xs: tuple[Tensor, ...], like: Inputs) -> Inputs:
    return xs[0] if isinstance(like, Tensor) else xs


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """U[0, 1) on ``like``'s device and dtype. ``generator=None`` is not passed on: under torch.compile
    with dynamic shapes, ``torch.rand(..., generator=None)`` fails to trace."""
    if generator is None:
        return torch.rand(shape, device=like.device, dtype=like.dtype)
    return torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator)


def _interpolate(
    reals: tuple[Tensor, ...], fakes: tuple[Tensor, ...], alpha: Tensor | None, generator: torch.Generator | None
) -> tuple[Tensor, ...]:
    first = reals[0]
    if generator is not None:
        check_generator(generator, first)
    if len(reals) == 1:  # the common case, with no op that does nothing (each costs a dispatch)
        r, f = first, fakes[0]
        shape = (r.shape[0],) + (1,) * (r.ndim - 1)
        # Drawn in this shape: the same numbers as (N,) and a view, one op fewer.
        if alpha is None:
            a = _rand(shape, generator, r)
        else:
            a = check_alpha(alpha, r)
            a = (a if a.dtype == r.dtype else a.to(r.dtype)).view(shape)
        r, f = (r.detach() if r.requires_grad else r), (f.detach() if f.requires_grad else f)
        # lerp(f, r, a) = f + a (r - f); exact at a = 0 (fake) and a = 1 (real).
        return (torch.lerp(f, r, a),)
    if alpha is None:
        # Drawn in the widest of the inputs' dtypes, then rounded per input: one alpha for all inputs.
        widest = functools.reduce(torch.promote_types, (r.dtype for r in reals))
        alpha = _rand((first.shape[0],), generator, first.to(widest) if first.dtype != widest else first)
    else:
        alpha = check_alpha(alpha, first)
    return tuple(
        torch.lerp(f.detach(), r.detach(), alpha.to(r.dtype).view(-1, *([1] * (r.ndim - 1))))
        for r, f in zip(reals, fakes, strict=True)
    )


def interpolate(
    real: Inputs, fake: Inputs, alpha: Tensor | None = None, generator: torch.Generator | None = None
) -> Inputs:
    r"""Random points on the lines between real and fake samples.

    .. math::
        \hat x_i &= \alpha_i\, x^{r}_i + (1 - \alpha_i)\, x^{f}_i,

        \alpha_i &\sim U[0, 1]

    One :math:`\alpha_i` per sample (never per element), drawn on the inputs' device. The
    result is detached: no gradient flows back into ``real`` or ``fake``.

    Args:
        real (Tensor or tuple of Tensors): real batch :math:`(N, *)`, or a tuple of batches for a
            multi-input critic; every input is interpolated with the same :math:`\alpha`.
        fake (Tensor or tuple of Tensors): fake batch, same shapes, dtype and device as ``real``.
        alpha (Tensor, optional): the weights, shape :math:`(N,)`, values in :math:`[0, 1]`.
            Default: drawn from :math:`U[0, 1]`.
        generator (torch.Generator, optional): RNG for :math:`\alpha`, on the inputs' device.

    Returns:
        Tensor or tuple of Tensors: :math:`\hat x`, with the structure of ``real``.

    Raises:
        TypeError: if an input is not a floating-point tensor, or ``generator`` is not a Generator.
        ValueError: if ``real`` and ``fake`` differ in shape, the batch is empty, ``alpha`` is
            not of shape :math:`(N,)` or leaves :math:`[0, 1]`, or ``generator`` is on another device.

    Example::

        >>> real, fake = torch.ones(4, 3, 8, 8), torch.zeros(4, 3, 8, 8)
        >>> alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
        >>> x_hat = gradpen.interpolate(real, fake, alpha=alpha)
        >>> x_hat[:, 0, 0, 0]
        tensor([0.0000, 0.2500, 0.5000, 1.0000])
    """
    reals, fakes = as_pair(real, fake)
    return _pack(_interpolate(reals, fakes, alpha, generator), real)


@eager_below_compile_region
def gradient_norms(
    critic: Critic,
    inputs: Inputs,
    *,
    backend: str | FiniteDifference = "autograd",
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    scaler: Any = None,
    create_graph: bool = True,
) -> Tensor:
    r"""Per-sample L2 norms of the critic's gradient with respect to its input.

    .. versionchanged:: 0.3
        ``backend="fd"`` (and a :class:`~gradpen.FiniteDifference`).

    .. math::
        n_i &= \big\lVert \nabla_{x_i} D(x)_i \big\rVert_2

            &= \Big(\sum_{j} \big(\partial D(x)_i / \partial x_{i,j}\big)^2\Big)^{1/2}

    where :math:`D(x)_i` is the sum of sample :math:`i`'s critic outputs and :math:`j` runs over
    all non-batch dimensions (of all inputs, for a multi-input critic). This is the per-sample
    norm: not over the whole batch, not per pixel.

    Args:
        critic (Callable): maps ``inputs`` (plus ``critic_args``) to one score per sample: a
            tensor of shape :math:`(N,)`, :math:`(N, 1)` or :math:`(N, \dots)` (then summed per sample).
        inputs (Tensor or tuple of Tensors): batch :math:`(N, *)` or a tuple of batches with the same N.
        backend (str or FiniteDifference, optional): ``"autograd"``, ``"func"`` or ``"fd"`` (no double
            backward; a :class:`~gradpen.FiniteDifference` sets its step); see :doc:`/backends`.
            Default: ``"autograd"``.
        critic_args (tuple, optional): extra positional arguments, the critic is called as
            ``critic(*inputs, *critic_args, **critic_kwargs)``. Every tensor in them (also inside
            lists, tuples and dicts) is **per-sample**, row :math:`i` going with sample :math:`i`
            (labels, conditions): its leading dimension must be N, and it is a constant, never
            differentiated nor interpolated. ``nn.Parameter``\ s, 0-d tensors and tensors wrapped in
            :func:`gradpen.shared` are **shared** by all samples and keep their gradients. The same on
            both backends. Default: ``()``.
        critic_kwargs (dict, optional): extra keyword arguments of the critic, with the same rule.
            Default: ``None``.
        scaler (torch.amp.GradScaler, optional): the GradScaler of an fp16 AMP loop. The input
            gradient is seeded with :math:`\min(S/N, 2^{10})` for the current scale :math:`S`, and the
            norm divided by the same number: small fp16 gradients do not underflow, the seed never
            overflows fp16 (:math:`S = 2^{16}` would), and the result is the unscaled one. Default: ``None``.
        create_graph (bool, optional): keep the graph so the norms can be differentiated with
            respect to the critic's parameters. ``False`` for logging only. Default: ``True``.

    Returns:
        Tensor: norms of shape :math:`(N,)`, float32 or wider.

    Raises:
        TypeError: if an argument has the wrong type or the critic returns a non-tensor.
        ValueError: if the batch is empty, the backend is unknown, a per-sample tensor in
            ``critic_args`` does not have N rows, or the critic's output has no batch dimension N.
        RuntimeError: under ``torch.inference_mode()`` with ``create_graph=True``.
        UnsupportedCriticError: as for :func:`gradient_penalty`.

    Example::

        >>> critic = torch.nn.Linear(3, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[3.0, 0.0, 4.0]]))
        >>> gradpen.gradient_norms(critic, torch.randn(5, 3), create_graph=False)
        tensor([5., 5., 5., 5., 5.])
    """
    xs = as_inputs(inputs, "inputs")
    create_graph = check_bool(create_graph, "create_graph")
    with _grad_mode(create_graph):
        return _norms_at(critic, xs, backend, critic_args, critic_kwargs, scaler, create_graph)


@eager_below_compile_region
def gradient_penalty(
    critic: Critic,
    real: Inputs,
    fake: Inputs,
    center: float = 1.0,
    one_sided: bool = False,
    *,
    backend: str | FiniteDifference = "autograd",
    alpha: Tensor | None = None,
    generator: torch.Generator | None = None,
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    scaler: Any = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Gradient penalty of WGAN-GP (Gulrajani et al., 2017).

    .. versionchanged:: 0.3
        ``backend="fd"`` (and a :class:`~gradpen.FiniteDifference`).

    .. math::
        \mathcal{P} &= \mathbb{E}_{\hat x}\big[(\lVert \nabla_{\hat x} D(\hat x) \rVert_2 - c)^2\big],

        \hat x &= \alpha\, x_r + (1-\alpha)\, x_f,\quad \alpha \sim U[0, 1]

    With ``one_sided=True`` the summand is :math:`\max(0, \lVert g \rVert_2 - c)^2`, the Lipschitz
    penalty (LP) of Petzka et al. (2018). ``center=0`` gives the zero-centred penalty. The norm is
    per sample over all non-batch dimensions; :math:`\alpha` is drawn once per sample. The caller
    applies the weight :math:`\lambda` (10 in the paper).

    Args:
        critic (Callable): maps a batch :math:`(N, *)` (and ``critic_args``) to scores of shape
            :math:`(N,)`, :math:`(N, 1)` or a per-sample map :math:`(N, \dots)`, which is summed per sample.
        real (Tensor or tuple of Tensors): real batch; a tuple for a multi-input critic, whose norm
            is then taken jointly over all inputs. Treated as a constant.
        fake (Tensor or tuple of Tensors): fake batch, same shapes; treated as a constant (no
            gradient reaches the generator).
        center (float, optional): target norm :math:`c \ge 0`. Default: ``1.0``.
        one_sided (bool, optional): penalise only norms above ``center``. Default: ``False``.
        backend (str or FiniteDifference, optional): ``"autograd"`` or ``"func"`` (a double backward;
            both give the same answers), or ``"fd"`` (no double backward: the exact value, and a
            finite-difference parameter gradient; see :doc:`/fd`); see :doc:`/backends`.
            Default: ``"autograd"``.
        alpha (Tensor, optional): interpolation weights :math:`(N,)` in :math:`[0, 1]`, used as
            given. Default: drawn from :math:`U[0, 1]`.
        generator (torch.Generator, optional): RNG for :math:`\alpha`, on the inputs' device.
        critic_args (tuple, optional): extra positional arguments, the critic is called as
            ``critic(*inputs, *critic_args, **critic_kwargs)``. Every tensor in them (also inside
            lists, tuples and dicts) is **per-sample**, row :math:`i` going with sample :math:`i`
            (labels, conditions): its leading dimension must be N, and it is a constant, never
            differentiated nor interpolated. ``nn.Parameter``\ s, 0-d tensors and tensors wrapped in
            :func:`gradpen.shared` are **shared** by all samples and keep their gradients. The same on
            both backends. Default: ``()``.
        critic_kwargs (dict, optional): extra keyword arguments of the critic, with the same rule.
            Default: ``None``.
        scaler (torch.amp.GradScaler, optional): the GradScaler of an fp16 AMP loop. The input
            gradient is seeded with :math:`\min(S/N, 2^{10})` for the current scale :math:`S`, and the
            norm divided by the same number: small fp16 gradients do not underflow, the seed never
            overflows fp16 (:math:`S = 2^{16}` would), and the result is the unscaled one. Default: ``None``.
        reduction (str, optional): ``"mean"``, ``"sum"`` or ``"none"``. Default: ``"mean"``.
        return_norms (bool, optional): also return the per-sample norms. Default: ``False``.

    Returns:
        Tensor or (Tensor, Tensor): the penalty (a scalar, or :math:`(N,)` with
        ``reduction="none"``), differentiable with respect to the critic's parameters; with
        ``return_norms=True`` also the norms :math:`(N,)`. Float32 under fp16/bf16 autocast;
        float64 inputs give float64.

    Shape:
        real, fake: :math:`(N, *)` (or tuples of such, with the same N).
        output: scalar, or :math:`(N,)` with ``reduction="none"``.

    Raises:
        TypeError: if an input is not a floating-point tensor, or an option has the wrong type.
        ValueError: if ``real`` and ``fake`` differ in shape, the batch is empty, ``center`` is
            negative or not finite, ``alpha`` is not :math:`(N,)` in :math:`[0, 1]`, the backend or
            reduction is unknown, a per-sample tensor in ``critic_args`` does not have N rows, or the
            critic's output has no batch dimension N.
        RuntimeError: under ``torch.inference_mode()``, where no differentiable result can be
            built (under ``torch.no_grad()`` the penalty is still differentiable).
        UnsupportedCriticError: where the backend cannot be right for this critic, before the
            penalty is used: the exact backends for FSDP, static-graph DDP or an op without a double
            backward; ``"fd"`` for a critic with kinks or static-graph DDP. The message names the
            alternatives; see :doc:`/differentiable`.

    Warns:
        UserWarning: with ``backend="autograd"``, if the critic couples the samples of a batch
            (BatchNorm in training mode, or found by behaviour: minibatch standard deviation);
            ``"func"`` and ``"fd"`` raise ``ValueError`` for such a critic.

    Example::

        >>> critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1))
        >>> real, fake = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
        >>> gp = gradpen.gradient_penalty(critic, real, fake)
        >>> loss_d = critic(fake).mean() - critic(real).mean() + 10 * gp
        >>> loss_d.backward()
        >>> w = critic[1].weight  # a linear critic: the penalty is (||w|| - 1)^2
        >>> torch.allclose(gp, (w.norm() - 1) ** 2)
        True
    """
    reals, fakes = as_pair(real, fake)
    center = _check_shape(center, one_sided, reduction, return_norms)
    x_hat = _interpolate(reals, fakes, alpha, generator)
    with _grad_mode(True):
        norms = _norms_at(critic, x_hat, backend, critic_args, critic_kwargs, scaler, True)
        return _finish(_two_sided_or_not(norms, center, one_sided), norms, reduction, return_norms)


def _squared_norm_penalty(
    critic: Critic,
    x: Inputs,
    name: str,
    backend: str,
    critic_args: Any,
    critic_kwargs: Any,
    scaler: Any,
    reduction: str,
    return_norms: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    xs = as_inputs(x, name)
    _check_options(reduction, return_norms)
    with _grad_mode(True):
        norms = _norms_at(critic, xs, backend, critic_args, critic_kwargs, scaler, True)
        return _finish(norms.square(), norms, reduction, return_norms)


@eager_below_compile_region
def r1_penalty(
    critic: Critic,
    real: Inputs,
    *,
    backend: str | FiniteDifference = "autograd",
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    scaler: Any = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""R1 penalty on real samples (Mescheder et al., 2018).

    .. versionchanged:: 0.3
        ``backend="fd"`` (and a :class:`~gradpen.FiniteDifference`).

    .. math::
        R_1 = \mathbb{E}_{x \sim p_r}\big[\lVert \nabla_x D(x) \rVert_2^2\big]

    No :math:`\gamma/2` factor is applied: the caller weights it, as StyleGAN2 does with
    ``r1 * (gamma / 2)``. Arguments are those of :func:`gradient_penalty`; ``real`` may be a
    tuple for a multi-input critic.

    Returns:
        Tensor or (Tensor, Tensor): the penalty (scalar, or :math:`(N,)` with ``reduction="none"``),
        and the norms :math:`(N,)` with ``return_norms=True``.

    Raises:
        TypeError: if ``real`` is not a floating-point tensor or an option has the wrong type.
        ValueError: if the batch is empty, the backend or reduction is unknown, or the critic's
            output has no batch dimension N.

    Example::

        >>> critic = lambda x: 0.5 * x.pow(2).sum(dim=1)  # gradient x, so R1 = E||x||^2
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> round(gradpen.r1_penalty(critic, x).item(), 4)
        13.0
    """
    return _squared_norm_penalty(
        critic, real, "real", backend, critic_args, critic_kwargs, scaler, reduction, return_norms
    )


@eager_below_compile_region
def r2_penalty(
    critic: Critic,
    fake: Inputs,
    *,
    backend: str | FiniteDifference = "autograd",
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    scaler: Any = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""R2 penalty on fake samples (Mescheder et al., 2018).

    .. versionchanged:: 0.3
        ``backend="fd"`` (and a :class:`~gradpen.FiniteDifference`).

    .. math::
        R_2 = \mathbb{E}_{x \sim p_g}\big[\lVert \nabla_x D(x) \rVert_2^2\big]

    Like :func:`r1_penalty`, unweighted; ``fake`` is treated as a constant.

    Returns:
        Tensor or (Tensor, Tensor): as for :func:`r1_penalty`.

    Raises:
        TypeError: if ``fake`` is not a floating-point tensor or an option has the wrong type.
        ValueError: as for :func:`r1_penalty`.

    Example::

        >>> critic = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = critic.weight.fill_(2.0)
        >>> round(gradpen.r2_penalty(critic, torch.randn(4, 2)).item(), 4)  # ||w||^2 = 8
        8.0
    """
    return _squared_norm_penalty(
        critic, fake, "fake", backend, critic_args, critic_kwargs, scaler, reduction, return_norms
    )


@eager_below_compile_region
def dragan_penalty(
    critic: Critic,
    real: Inputs,
    center: float = 1.0,
    one_sided: bool = False,
    *,
    noise_scale: float = 0.5,
    generator: torch.Generator | None = None,
    backend: str | FiniteDifference = "autograd",
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    scaler: Any = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""DRAGAN penalty around the real data (Kodali et al., 2017).

    .. versionchanged:: 0.3
        ``backend="fd"`` (and a :class:`~gradpen.FiniteDifference`).

    .. math::
        x_p &= x + s\,\sigma_x\,u,\quad u \sim U[0, 1)^{\dim x},

        \hat x &= \alpha x + (1 - \alpha) x_p,\quad \alpha \sim U[0, 1],

        \mathcal{P} &= \mathbb{E}\big[(\lVert \nabla_{\hat x} D(\hat x)\rVert_2 - c)^2\big]

    as in the official DRAGAN code: :math:`\sigma_x` is the (population) standard deviation of the whole batch
    (of each input, for a multi-input critic), :math:`u` is drawn per element and :math:`\alpha`
    per sample. So every :math:`\hat x` lies within :math:`s\,\sigma_x` of its real sample, per element.

    Args:
        noise_scale (float, optional): :math:`s > 0`. Default: ``0.5``.
        generator (torch.Generator, optional): RNG for :math:`u` and :math:`\alpha`, on the inputs' device.

    The other arguments are those of :func:`gradient_penalty`.

    Returns:
        Tensor or (Tensor, Tensor): as for :func:`gradient_penalty`.

    Raises:
        TypeError: if ``real`` is not a floating-point tensor or an option has the wrong type.
        ValueError: if the batch is empty, ``center < 0``, ``noise_scale <= 0``, or as for
            :func:`gradient_penalty`.

    Example::

        >>> critic = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[0.6, 0.8]]))  # ||w|| = 1
        >>> round(gradpen.dragan_penalty(critic, torch.randn(8, 2)).item(), 4)
        0.0
    """
    xs = as_inputs(real, "real")
    center = _check_shape(center, one_sided, reduction, return_norms)
    noise_scale = check_number(noise_scale, "noise_scale", low=0.0, strict=True)
    check_generator(generator, xs[0])
    perturbed = tuple(x + noise_scale * x.std(correction=0) * _rand(x.shape, generator, x) for x in xs)
    x_hat = _interpolate(xs, perturbed, None, generator)
    with _grad_mode(True):
        norms = _norms_at(critic, x_hat, backend, critic_args, critic_kwargs, scaler, True)
        return _finish(_two_sided_or_not(norms, center, one_sided), norms, reduction, return_norms)


@eager_below_compile_region
def wgan_div_penalty(
    critic: Critic,
    real: Inputs,
    fake: Inputs,
    *,
    k: float = 2.0,
    p: float = 6.0,
    backend: str | FiniteDifference = "autograd",
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    scaler: Any = None,
    reduction: str = "mean",
    return_norms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Wasserstein divergence penalty of WGAN-div (Wu et al., 2018).

    .. versionchanged:: 0.3
        ``backend="fd"`` (and a :class:`~gradpen.FiniteDifference`).

    .. math::
        \mathcal{P} = \frac{k}{2}\,\mathbb{E}_i\big[\lVert \nabla D(x^{r}_i) \rVert_2^{p}
        + \lVert \nabla D(x^{f}_i) \rVert_2^{p}\big]

    evaluated at the real and the fake samples themselves (no interpolation), with the paper's
    defaults :math:`k = 2`, :math:`p = 6`. Unlike the other penalties, :math:`k` is part of the
    formula; the caller adds the result to the critic loss without further weight.

    Args:
        k (float, optional): :math:`k > 0`. Default: ``2.0``.
        p (float, optional): :math:`p \ge 1`; smaller powers have an infinite slope at a zero
            gradient. Default: ``6.0``.

    The other arguments are those of :func:`gradient_penalty`.

    Returns:
        Tensor or (Tensor, Tensor): the penalty (scalar, or :math:`(N,)` per pair with
        ``reduction="none"``); with ``return_norms=True`` also the norms, shape :math:`(2, N)`:
        row 0 at the real samples, row 1 at the fake ones.

    Raises:
        TypeError: if an input is not a floating-point tensor or an option has the wrong type.
        ValueError: if ``real`` and ``fake`` differ in shape, ``k <= 0``, ``p < 1``, or as for
            :func:`gradient_penalty`.

    Example::

        >>> critic = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = critic.weight.fill_(1.0)  # ||w||^2 = 2, so ||w||^6 = 8
        >>> div = gradpen.wgan_div_penalty(critic, torch.randn(4, 2), torch.randn(4, 2))
        >>> round(div.item(), 4)  # k/2 (8 + 8) with k = 2
        16.0
    """
    reals, fakes = as_pair(real, fake)
    k = check_number(k, "k", low=0.0, strict=True)
    p = check_number(p, "p", low=1.0)
    _check_options(reduction, return_norms)
    args = (backend, critic_args, critic_kwargs, scaler, True)
    with _grad_mode(True):
        norms = torch.stack([_norms_at(critic, reals, *args), _norms_at(critic, fakes, *args)])
        return _finish(0.5 * k * norms.pow(p).sum(0), norms, reduction, return_norms)
