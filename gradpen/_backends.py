r"""How the per-sample input gradients are obtained, and how they depend on the critic's parameters.

A backend takes the critic, a tuple of input batches ``(N, *)``, the resolved critic arguments
(:class:`gradpen._args.CriticCall`), a seed and ``create_graph``, and returns one gradient per input,
of the same shapes: row ``i`` is ``seed`` times the gradient of sample ``i``'s summed critic output with
respect to sample ``i``'s inputs. Everything else (interpolation, norm, center, clamp, reduction) lives
in :mod:`gradpen._penalty` and is written once.

==========  ====================================================  ==================================
backend     how (``create_graph=True``)                           per-sample only when
==========  ====================================================  ==================================
autograd    ``autograd.grad(D(x), x, seed, create_graph)``        samples do not interact
func        ``vmap(grad(lambda x_i: D(x_i[None]).sum() * s))``    always (each sample on its own)
fd          ``autograd.grad(D(x), x)``; the parameter gradient    samples do not interact (refused
            of its norm from :math:`D(x \pm h u)`, :math:`u`      otherwise)
            the unit gradient
==========  ====================================================  ==================================

All give zeros for inputs the critic does not depend on, and all treat per-sample critic arguments
as constants. The exact backends (autograd, func) differentiate the critic twice: they first run the
guards of :mod:`gradpen._guards` (FSDP and static-graph DDP are refused before any work), run the
critic with ``scaled_dot_product_attention`` on its MATH kernel (the only one with a double backward),
and refuse, once per critic, a graph holding an op without a double backward. ``fd`` runs first-order
passes only, on the default kernels; it refuses critics whose input gradient jumps (kinks) instead.

**fd, the trick.** Every penalty is a function of the per-sample norm :math:`n_i = \lVert g_i \rVert`,
:math:`g_i = \nabla_x D(x_i)`. With :math:`u_i = g_i / n_i` held constant,
:math:`\nabla_\theta n_i = \nabla_\theta (g_i \cdot u_i)`, the parameter gradient of a directional
derivative, which a central difference gives from forwards alone:

.. math::
    d_i = \frac{D(x_i + h_i u_i) - D(x_i - h_i u_i)}{2 h_i}, \qquad
    h_i = c \cdot \mathrm{RMS}(x_i), \quad c = 5\,\varepsilon^{1/3}

(:math:`\varepsilon` of the critic's compute dtype: the classic optimum of a central difference). The
backend returns the exact :math:`g_i` (one backward without ``create_graph``) in a wrapper whose
gradient, for any function of the norm, is the one of :math:`n_i + d_i - \mathrm{stop}(d_i)`. So the
values and norms are exact, and only their dependence on the parameters is finite-differenced.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradpen._args import CriticCall
from gradpen._checks import _type_name, check_bool, check_choice, check_critic_output, check_number
from gradpen._compat import autocast_dtype
from gradpen._forwards import Replay, can_fuse
from gradpen._guards import (
    CriticCache,
    FunctionWatch,
    Scan,
    UnsupportedCriticError,
    attention_context,
    attention_free,
    batch_coupled_modules,
    check_distributed_fd,
    check_exact_critic,
    check_graph,
    func_failure,
    grad_enabled,
    graph_checked,
    kinked_modules,
    probe_graph,
)
from gradpen._probes import KINK_TOL, batch_coupled, batch_coupled_by_forward, kink_ratio, known_uncoupled

Backend = Callable[..., tuple[Tensor, ...]]

COUPLED = (
    "The critic couples the samples of a batch: changing one sample moved the scores of the others "
    "(minibatch standard deviation, batch statistics written by hand, attention across the batch)."
)


def _under_compile(scan: Scan) -> bool:
    """Inside a torch.compile region, or a critic made by ``torch.compile(module)`` (the critic ``scan``
    was made for)."""
    return torch.compiler.is_compiling() or scan.compiled


def _batchnorm_message(coupled: list[str], what: str) -> str:
    return (
        f"{what} a critic with BatchNorm in training mode ({', '.join(coupled[:3])}), which couples the "
        "samples of a batch: each sample's input gradient then depends on the others and the gradient "
        "penalty is wrong (Gulrajani et al. 2017, Sec. 4). Use LayerNorm or GroupNorm in the critic, or no "
        "normalisation, or put the BatchNorm layers in eval mode."
    )


def warn_if_coupled(
    critic: Any,
    out: Tensor,
    leaves: tuple[Tensor, ...],
    stacklevel: int,
    scan: Scan | None = None,
    key: tuple[Any, ...] | None = None,
) -> None:
    """The autograd backend (and gradient_norms_from with a critic): warn about batch coupling, by type
    (BatchNorm) or by behaviour (:func:`gradpen._probes.batch_coupled`, on the graph of ``out``)."""
    scan = scan or Scan(critic)
    if scan.batchnorm:
        coupled = batch_coupled_modules(critic, scan)
        warnings.warn(
            f"The critic has BatchNorm in training mode ({', '.join(coupled[:3])}), which couples the "
            "samples of a batch: each sample's input gradient then depends on the others and the "
            "gradient penalty is wrong (Gulrajani et al. 2017, Sec. 4). Use LayerNorm or GroupNorm "
            "in the critic, or no normalisation.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    elif batch_coupled(critic, out, leaves, key):
        warnings.warn(
            f"{COUPLED} Row i of the input gradient is then the gradient of the batch's summed score with "
            "respect to sample i, not sample i's own gradient, and the penalty is built on it. That is "
            "StyleGAN2's R1 for its minibatch-std discriminator, and right for it; for other critics, "
            "remove the coupling. backend='func' and backend='fd' refuse such a critic.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def refuse_if_coupled(
    critic: Any, coupled_by_behaviour: Callable[[], bool], backend: str, scan: Scan | None = None
) -> None:
    """func and fd: a batch-coupled critic is refused (they cannot give the batch-sum gradient)."""
    coupled = batch_coupled_modules(critic, scan)
    if coupled:
        raise ValueError(_batchnorm_message(coupled, f"backend={backend!r} cannot run"))
    if coupled_by_behaviour():
        why = (
            "vmap evaluates one sample at a time, so the other samples' part of the gradient is lost"
            if backend == "func"
            else "its finite difference moves every sample at once, which mixes the samples' gradients"
        )
        raise ValueError(
            f"backend={backend!r} cannot run this critic: {COUPLED} The per-sample gradient is then not "
            f"defined, and {why}. backend='autograd' gives the gradient of the batch's summed score, which is "
            "StyleGAN2's R1 for a minibatch-std discriminator; otherwise remove the coupling."
        )


# --------------------------------------------------------------------------- autograd


def autograd_grads(
    critic: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    call: CriticCall,
    seed: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """One backward of the batch output: per-sample as long as samples do not interact.

    torch.compile's AOTAutograd has no double backward, so under compile (a compiled region, or a
    compiled critic module) this routes to :func:`func_grads`, which gives the same answers.

    Raises:
        UnsupportedCriticError: for FSDP or static-graph DDP (before any work), or an op without a
            double backward (after the first backward, the first time this critic is seen).

    Warns:
        UserWarning: if the critic couples the samples of a batch (BatchNorm, or found by behaviour).
    """
    scan = Scan(critic)
    if _under_compile(scan):
        return func_grads(critic, inputs, call, seed, create_graph)
    check_exact_critic(critic, scan)
    n = inputs[0].shape[0]
    key = scan.key  # once, for the cached checks
    leaves = _leaves(inputs)
    if create_graph and not scan.batchnorm and _settled.has(critic, key):
        # Later calls of a critic whose once-per-critic checks all passed with nothing to redo: its graph
        # was checked, it has no attention on the input path and does not couple samples. (The caller
        # has grad mode on, as for every create_graph call.)
        return input_grads(check_critic_output(call(critic, *leaves), n), leaves, seed, True)
    with grad_enabled():
        with attention_context(critic, key):
            out = check_critic_output(call(critic, *leaves), n)
        warn_if_coupled(critic, out, leaves, 6, scan, key)
        check = create_graph and out.requires_grad and not graph_checked(critic, key)
        watch = FunctionWatch(out, leaves) if check else None
        grads = input_grads(out, leaves, seed, create_graph)
    if check:
        check_graph(critic, out, leaves, grads, watch)
    if create_graph and graph_checked(critic, key) and attention_free(critic, key) and known_uncoupled(critic, key):
        _settled.set(critic)
    return grads


# Critics (by critic_key) for which the autograd backend's later calls skip the cached checks.
_settled = CriticCache()


def _leaves(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The points as new leaves that require grad (never the caller's tensors)."""
    if len(inputs) == 1:  # the common case, without the generator
        return (inputs[0].detach().requires_grad_(True),)
    return tuple(x.detach().requires_grad_(True) for x in inputs)


def input_grads(
    out: Tensor, inputs: tuple[Tensor, ...], seed: Tensor | None, create_graph: bool, retain_graph: bool = False
) -> tuple[Tensor, ...]:
    """``seed`` times the gradient of ``out.sum()`` w.r.t. each of ``inputs``; zeros where it does not
    depend on one (a critic that ignores an input, or a constant)."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(x) for x in inputs)
    grad_out = torch.ones_like(out) if seed is None else seed.to(out.dtype).expand_as(out)
    grads = torch.autograd.grad(
        out, inputs, grad_out, create_graph=create_graph, retain_graph=retain_graph or create_graph, allow_unused=True
    )
    if len(grads) == 1 and grads[0] is not None:  # the common case, without the loop
        return grads
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True))


# --------------------------------------------------------------------------- func


def func_grads(
    critic: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    call: CriticCall,
    seed: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """``torch.func.vmap`` over ``torch.func.grad`` of the single-sample critic.

    The per-sample critic arguments are mapped over with the inputs (each sample gets its row);
    shared ones are passed whole. Randomness (dropout) differs per sample.

    Raises:
        UnsupportedCriticError: for FSDP or static-graph DDP, an op without a double backward (the
            first time this critic is seen; outside torch.compile), or an op vmap cannot run.
        ValueError: for a critic that couples the samples of a batch (BatchNorm in training mode, or
            found by behaviour).
    """
    scan = Scan(critic)
    check_exact_critic(critic, scan)
    key, compiled = scan.key, _under_compile(scan)
    inputs = (inputs[0].detach(),) if len(inputs) == 1 else tuple(x.detach() for x in inputs)

    def one_sample(xs: tuple[Tensor, ...], rows: tuple[Tensor, ...]) -> Tensor:
        out = call.with_rows(tuple(r[None] for r in rows))(critic, *(x[None] for x in xs))
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
            _one_sample_output(out, inputs[0].shape[0])
        total = out.sum()
        return total if seed is None else total * seed

    rows = call.rows()
    if len(inputs) == 1 and not rows:  # the common case: one tensor through vmap and grad, not two pytrees
        per_sample = torch.func.vmap(torch.func.grad(lambda x: one_sample((x,), ())), randomness="different")
        args: tuple[Any, ...] = (inputs[0],)
    else:
        per_sample = torch.func.vmap(torch.func.grad(one_sample), randomness="different")
        args = (inputs, rows)
    if compiled and scan.batchnorm:
        raise ValueError(_batchnorm_message(batch_coupled_modules(critic, scan), "backend='func' cannot run"))
    try:
        if not compiled:
            refuse_if_coupled(critic, lambda: batch_coupled_by_forward(critic, inputs, call, key), "func", scan)
        if create_graph and not compiled:
            probe_graph(critic, inputs, call, key)
        with grad_enabled() if create_graph else torch.no_grad(), attention_context(critic, key):
            try:
                grads = per_sample(*args)
            except RuntimeError as e:
                unsupported = func_failure(e)
                if unsupported is None:
                    raise
                raise unsupported from e
    except (IndexError, RuntimeError, ValueError) as e:
        hinted = _with_row_hint(e, call)
        if hinted is None:
            raise
        raise hinted from e
    return (grads,) if isinstance(grads, Tensor) else grads


def _with_row_hint(e: Exception, call: CriticCall) -> Exception | None:
    """func: a failure of the critic on one sample's rows, as an error of the same type that says which
    tensors it was given per sample (``None`` where there is nothing to add)."""
    if not (any(call.per_sample) or call.sample_lists):  # the common case: nothing per sample
        return None
    hint = []
    if call.rows():
        hint.append(
            f"it gives it that sample's row of each per-sample tensor in critic_args/critic_kwargs "
            f"({', '.join(call.row_names())}); a tensor the critic uses whole, such as an embedding table with "
            "N rows by chance, must be passed as gradpen.shared(tensor)"
        )
    if call.sample_lists:
        hint.append(
            "a list or tuple of N non-tensor values (labels from a collate) is passed whole, not per "
            "sample; pass it as a tensor with N rows"
        )
    if isinstance(e, UnsupportedCriticError) or torch.compiler.is_compiling() or "one sample" in str(e):
        return None
    return type(e)(f"{e}\n(backend='func' calls the critic on one sample at a time: {'; '.join(hint)}.)")


def _one_sample_output(out: Any, n: int) -> None:
    """func calls the critic on one sample at a time: say so when its output does not have one row."""
    check_critic_output(out, 1)  # the type errors
    raise ValueError(
        f"`critic` must return one score per sample: backend='func' calls it on one sample at a time "
        f"(a batch of 1), and it returned shape {tuple(out.shape)}. If the critic takes a per-sample list "
        f"(labels from a collate, {n} items) through critic_args, pass it as a tensor with N={n} rows, which "
        "func slices per sample; other non-tensor arguments are passed whole."
    )


# --------------------------------------------------------------------------- fd


FD_SCHEMES = {"central": 2, "forward": 1}  # scheme -> extra critic forwards


def default_step(dtype: torch.dtype, scheme: str = "central") -> float:
    """The fd step relative to the inputs' RMS, for the compute dtype's eps: central 5 eps^(1/3) (float32
    0.0246, float64 3.0e-5, float16 0.50, bfloat16 0.99), forward 2 eps^(1/2) (float32 6.9e-4, float64
    3.0e-8, float16 0.063, bfloat16 0.18): the classic optima of each scheme's truncation against rounding."""
    eps = torch.finfo(dtype).eps
    return 5.0 * eps ** (1 / 3) if scheme == "central" else 2.0 * eps**0.5


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the critic computes in: autocast's for a float32 input under autocast, else the input's."""
    amp = autocast_dtype(x.device.type) if x.dtype == torch.float32 and x.device.type != "meta" else None
    return amp or x.dtype


class FiniteDifference:
    r"""``backend="fd"`` with its settings: the exact penalty, with no double backward.

    .. versionadded:: 0.3

    Pass an instance wherever a ``backend`` is taken; ``backend="fd"`` is ``FiniteDifference()``.
    Values and norms are the exact ones (one backward without ``create_graph``). The parameter
    gradient of the norm :math:`n_i` is that of the directional derivative along the unit input
    gradient :math:`u_i = g_i / n_i`, by a finite difference from first-order passes only:

    .. math::
        \nabla_\theta n_i &\approx \nabla_\theta\, \frac{D(x_i + h_i u_i) - D(x_i - h_i u_i)}{2 h_i}
        \quad (\text{central}),

        h_i &= c \cdot \mathrm{RMS}(x_i)

    (``"forward"``: :math:`(D(x_i + h_i u_i) - D(x_i)) / h_i`, one forward fewer, error
    :math:`O(h)` instead of :math:`O(h^2)`). :math:`\mathrm{RMS}(x_i)` is over all elements of all
    inputs of sample :math:`i` (the batch's RMS where a sample is all zeros; 1 where the batch is), so
    the step is scale-free.

    It runs where the double backward cannot: fused attention kernels (SDPA's flash and
    memory-efficient kernels, left on), FSDP2, ``@once_differentiable`` ops and compiled critics. It
    needs a smooth critic: a piecewise-linear one (ReLU, LeakyReLU, max-pooling) has an input gradient
    that jumps, and a difference across a jump is wrong. Such layers are refused when the modules
    show them, and a once-per-critic probe compares the finite-difference Hessian-vector product at
    the step and half of it to catch the rest (``F.relu`` in a forward); see :doc:`/fd`.

    Args:
        step (float, optional): :math:`c`, the step relative to the inputs' RMS, in :math:`(0, 1]`.
            Default: ``None``, chosen for the critic's compute dtype (autocast's under autocast):
            :math:`5\,\varepsilon^{1/3}` for ``"central"`` (0.0246 for float32, 3.0e-5 for float64,
            0.50 for float16, 0.99 for bfloat16) and :math:`2\,\varepsilon^{1/2}` for ``"forward"``
            (6.9e-4, 3.0e-8, 0.063, 0.18).
        scheme (str, optional): ``"central"`` (2 extra forwards) or ``"forward"`` (1). Default:
            ``"central"``.
        allow_kinks (bool, optional): accept a critic with kinks instead of refusing it. Its
            parameter gradient is then not the exact penalty's, but a difference quotient across the
            kinks; see :doc:`/fd`. Default: ``False``.

    Raises:
        ValueError: if ``step`` is not in :math:`(0, 1]` or the scheme is unknown.
        TypeError: if an option has the wrong type.

    Example::

        >>> nn = torch.nn
        >>> critic = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))
        >>> real, fake = torch.randn(8, 3), torch.randn(8, 3)
        >>> fd = gradpen.FiniteDifference(scheme="forward")
        >>> gp = gradpen.gradient_penalty(critic, real, fake, backend=fd)
        >>> gp.backward()  # no double backward ran
    """

    __slots__ = ("allow_kinks", "scheme", "step")

    def __init__(self, *, step: float | None = None, scheme: str = "central", allow_kinks: bool = False) -> None:
        if step is not None:
            step = check_number(step, "step", low=0.0, strict=True)
            if step > 1.0:
                raise ValueError(f"`step` is relative to the inputs' RMS and must be in (0, 1], got {step:g}.")
        check_choice(scheme, "scheme", FD_SCHEMES)
        self.step, self.scheme = step, scheme
        self.allow_kinks = check_bool(allow_kinks, "allow_kinks")

    def __repr__(self) -> str:
        return f"FiniteDifference(step={self.step!r}, scheme={self.scheme!r}, allow_kinks={self.allow_kinks!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FiniteDifference) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    def __call__(
        self,
        critic: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        call: CriticCall,
        seed: Tensor | None,
        create_graph: bool,
    ) -> tuple[Tensor, ...]:
        return fd_grads(critic, inputs, call, seed, create_graph, self)


class _AlongGradient(torch.autograd.Function):
    """Forward: the input gradients ``grads`` (constants). Backward: for any loss of them, the gradient
    that flows into ``dd`` (the directional derivatives, ``(N,)``) is the one it would have if every
    ``grads[k][i]`` were multiplied by ``1 + (dd_i - stop(dd_i)) / n_i``: ``sum_j dL/dg_ij * g_ij / n_i``,
    summed in float32 or wider; 0 where ``n_i = 0`` (no direction, no gradient, never NaN)."""

    @staticmethod
    def forward(ctx: Any, dd: Tensor, norms: Tensor, *grads: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(norms, *grads)
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx: Any, *grad_outs: Tensor | None) -> tuple[Tensor | None, ...]:
        norms, *grads = ctx.saved_tensors
        n = norms.shape[0]
        total = torch.zeros_like(norms)
        for go, g in zip(grad_outs, grads, strict=True):
            if go is not None:
                total = total + (go.reshape(n, -1).to(norms.dtype) * g.reshape(n, -1).to(norms.dtype)).sum(1)
        positive = norms > 0
        d_dd = torch.where(positive, total / torch.where(positive, norms, torch.ones_like(norms)), 0.0)
        return (d_dd, None, *([None] * len(grads)))


def _first_order(
    critic: Callable[..., Tensor], inputs: tuple[Tensor, ...], call: CriticCall, seed: Tensor | None
) -> tuple[Tensor, ...]:
    """The plain input gradient, no graph kept (``create_graph=False``: logging), on the default kernels."""
    leaves = _leaves(inputs)
    with torch.enable_grad():
        out = check_critic_output(call(critic, *leaves), inputs[0].shape[0])
        return input_grads(out, leaves, seed, create_graph=False)


def _rms(xs: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """Per-sample RMS over all elements of all inputs ``(N,)``; the batch's where a sample is all
    zeros, 1 where the whole batch is. No host sync."""
    sq = sum(x.detach().reshape(x.shape[0], -1).to(dtype).square().sum(1) for x in xs)
    rms = (sq / sum(x[0].numel() for x in xs)).sqrt()
    batch = rms.square().mean().sqrt()
    batch = torch.where(batch > 0, batch, torch.ones_like(batch))
    return torch.where(rms > 0, rms, batch)


def _summed(out: Any, n: int) -> Tensor:
    out = check_critic_output(out, n)
    return out.reshape(n, -1).sum(1, dtype=torch.promote_types(out.dtype, torch.float32))


def check_fd_critic(critic: Any, inputs: tuple[Tensor, ...], call: CriticCall, fd: FiniteDifference) -> None:
    """What fd cannot do, found before any work: BatchNorm, and kinked critics unless allowed (batch
    coupling found by behaviour is refused after the first forward, from its graph).

    Raises:
        ValueError: for a critic with BatchNorm in training mode.
        UnsupportedCriticError: for ``DistributedDataParallel(static_graph=True)``, or a critic with kinks
            (visible layers, or found by the probe).
    """
    scan = Scan(critic)
    check_distributed_fd(critic, scan)
    refuse_if_coupled(critic, lambda: False, "fd", scan)
    if fd.allow_kinks:
        return
    alternatives = (
        "backend='autograd' or 'func' (exact, where the critic can be differentiated twice); a smooth "
        "activation (SiLU, GELU, Softplus, ELU) and average pooling instead; the estimators "
        "gradpen.approx_r1_penalty / approx_r2_penalty / approx_gradient_penalty, which need no smoothness, "
        "where the double backward cannot run (fused attention, FSDP); or "
        "backend=gradpen.FiniteDifference(allow_kinks=True) to accept it"
    )
    kinked = kinked_modules(critic, scan)
    if kinked:
        raise UnsupportedCriticError(
            f"backend='fd' cannot give the exact penalty's gradient for this critic: it has piecewise-linear "
            f"layers ({', '.join(kinked[:3])}{', ...' if len(kinked) > 3 else ''}), whose kinks make the input "
            "gradient jump, and a finite difference across a jump is wrong (relative errors of 0.5 to 6). "
            f"Instead: {alternatives}."
        )
    ratio = kink_ratio(critic, inputs, call)
    if ratio is not None and ratio > KINK_TOL:
        raise UnsupportedCriticError(
            "backend='fd' cannot give the exact penalty's gradient for this critic: its input gradient jumps "
            f"along the finite-difference step (the Hessian-vector product at the step and half of it differ "
            f"by {ratio:.2f} relative, smooth critics give < {KINK_TOL:g}), as with F.relu, torch.maximum, "
            f"torch.abs or max-pooling in the forward. Instead: {alternatives}."
        )


@torch.compiler.disable
def fd_grads(
    critic: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    call: CriticCall,
    seed: Tensor | None,
    create_graph: bool,
    fd: FiniteDifference | None = None,
) -> tuple[Tensor, ...]:
    """The exact input gradient, whose dependence on the parameters is finite-differenced (see the
    module docstring). Every forward sees the same critic (:class:`gradpen._forwards.Replay`): the
    forward at x that gives the gradient, and those at x + h u and x - h u (one fused forward when that
    is equivalent). Runs eagerly under torch.compile (the critic itself may be compiled).

    Raises:
        ValueError: for a critic that couples the samples of a batch.
        UnsupportedCriticError: for a critic with kinks, unless allowed.
    """
    fd = fd if fd is not None else FiniteDifference()
    if not create_graph:
        return _first_order(critic, inputs, call, seed)
    inputs = tuple(x.detach() for x in inputs)
    check_fd_critic(critic, inputs, call, fd)
    n = inputs[0].shape[0]
    replay = Replay(critic, inputs[0].device)
    leaves = _leaves(inputs)
    base = fd.scheme == "forward"
    with torch.enable_grad():
        out = check_critic_output(call(critic, *leaves), n)
        refuse_if_coupled(critic, lambda: batch_coupled(critic, out, leaves), "fd")
        grads = input_grads(out, leaves, seed, create_graph=False, retain_graph=base)
    replay.done()
    if not out.requires_grad:
        return grads
    dd = directional_derivative(critic, call, inputs, grads, seed, fd, replay, _summed(out, n) if base else None)
    replay.finish()
    return along_gradient(grads, seed, dd)


def _norms(grads: tuple[Tensor, ...], seed: Tensor | None) -> Tensor:
    """The exact per-sample norms ``(N,)`` of the (seeded) gradients, unseeded, float32 or wider."""
    dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)
    n = grads[0].shape[0]
    sq = sum(g.detach().reshape(n, -1).to(dtype).square().sum(1) for g in grads)
    return sq.sqrt() if seed is None else sq.sqrt() / seed.to(dtype)


def directional_derivative(
    critic: Any,
    call: CriticCall,
    inputs: tuple[Tensor, ...],
    grads: tuple[Tensor, ...],
    seed: Tensor | None,
    fd: FiniteDifference,
    replay: Replay,
    at_x: Tensor | None,
) -> Tensor:
    """``(D(x + h u) - D(x - h u)) / 2h`` per sample (``(D(x + h u) - at_x) / h`` for the forward scheme),
    differentiable in the critic's parameters, float32 or wider; ``u`` the unit input gradient, 0 where
    the gradient is 0. ``replay`` was started before the forward that gave ``grads``, or is fresh
    (gradient_norms_from): then the first of these forwards is its first one."""
    n = inputs[0].shape[0]
    norms = _norms(grads, seed)
    wide = norms.dtype
    step = fd.step if fd.step is not None else max(default_step(compute_dtype(x), fd.scheme) for x in inputs)
    h = step * _rms(inputs, wide)
    positive = norms > 0
    scale = torch.where(positive, 1.0 / torch.where(positive, norms, torch.ones_like(norms)), 0.0)
    if seed is not None:
        scale = scale / seed.to(wide)

    def moved(sign: float) -> tuple[Tensor, ...]:
        t = (sign * h * scale).view(n, *([1] * (inputs[0].ndim - 1)))
        return tuple(
            (x.to(wide) + t.view(n, *([1] * (x.ndim - 1))) * g.detach().to(wide)).to(x.dtype)
            for x, g in zip(inputs, grads, strict=True)
        )

    signs = (1.0,) if at_x is not None else (1.0, -1.0)
    points = [moved(s) for s in signs]
    if len(points) == 2 and can_fuse(critic) and not (replay.drew_random or call.sample_lists):
        replay.rewind()
        stacked = tuple(torch.cat(column) for column in zip(*points, strict=True))
        scores = _summed(call.tiled(2)(critic, *stacked), 2 * n).view(2, n)
        replay.done()
    else:
        rows = []
        for xs in points:
            replay.rewind()
            rows.append(_summed(call(critic, *xs), n))
            replay.done()
        scores = torch.stack(rows)
    if at_x is not None:
        return (scores[0] - at_x) / h
    return (scores[0] - scores[1]) / (2 * h)


def along_gradient(grads: tuple[Tensor, ...], seed: Tensor | None, dd: Tensor) -> tuple[Tensor, ...]:
    """``grads`` whose norm has the parameter gradient of ``dd`` (see :class:`_AlongGradient`)."""
    return _AlongGradient.apply(dd, _norms(grads, seed), *(g.detach() for g in grads))


BACKENDS: dict[str, Backend] = {"autograd": autograd_grads, "func": func_grads, "fd": FiniteDifference()}


def resolve_backend(backend: Any) -> Backend:
    """A backend by name (:data:`BACKENDS`), or a :class:`FiniteDifference` instance."""
    if isinstance(backend, FiniteDifference):
        return backend
    if not isinstance(backend, str) or backend not in BACKENDS:
        got = repr(backend) if isinstance(backend, str) else f"{backend!r} ({_type_name(backend)})"
        raise ValueError(
            f"Unknown backend {got}. Expected one of {sorted(BACKENDS)}, or a gradpen.FiniteDifference(...)."
        )
    return BACKENDS[backend]


def backend_name(backend: Any) -> str:
    """``"fd"`` for a FiniteDifference instance, else the name itself (for messages)."""
    return "fd" if isinstance(backend, FiniteDifference) else str(backend)
