r"""Norms and penalties from a forward that has already run: :func:`gradient_norms_from`.

StyleGAN2 and R3GAN take R1 from the loss's own forward: the batch is made a leaf, the critic runs
once, and both the loss and the penalty come from its output. Here the critic's forward is not ours,
so what the backends do before and around their forward is done from the graph instead: the outputs
must reach the inputs, the inputs must be leaves, and the graph is checked for ops without a double
backward. With ``backend="fd"`` and the critic, the parameter gradient comes from forwards near the
inputs (:mod:`gradpen._backends`), which can only be trusted if the critic is deterministic and
writes no buffers, since the loss's forward cannot be replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradpen._args import resolve_critic_args
from gradpen._backends import (
    FiniteDifference,
    along_gradient,
    check_fd_critic,
    directional_derivative,
    refuse_if_coupled,
    resolve_backend,
    warn_if_coupled,
)
from gradpen._checks import as_inputs, check_bool, check_critic, check_critic_output
from gradpen._compat import eager_below_compile_region
from gradpen._forwards import Replay
from gradpen._guards import FunctionWatch, UnsupportedCriticError, check_graph, graph_checked
from gradpen._penalty import Critic, Inputs, _grad_mode, _grad_norms, _seed
from gradpen._probes import batch_coupled


@eager_below_compile_region
def gradient_norms_from(
    outputs: Tensor,
    inputs: Inputs,
    *,
    critic: Critic | None = None,
    backend: str | FiniteDifference = "autograd",
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
    scaler: Any = None,
    create_graph: bool = True,
) -> Tensor:
    r"""Per-sample L2 norms of the input gradient, from a critic forward that has already run.

    .. versionadded:: 0.2

    .. versionchanged:: 0.3
        ``critic``, ``backend`` (``"fd"``), ``critic_args`` and ``critic_kwargs``; refusals of outputs not
        attached to the inputs, of non-leaf inputs and of graphs without a double backward.

    .. math::
        n_i = \big\lVert \nabla_{x_i} \textstyle\sum_k \mathrm{outputs}_{i,k} \big\rVert_2

    For the penalties that reuse the loss's forward, as StyleGAN2 and R3GAN do: make the batch a
    leaf that requires grad, run the critic once, and take both the loss and the penalty from its
    output. The norm is the one of :func:`gradient_norms` (per sample, jointly over all inputs,
    float32 or wider, no NaN at a zero gradient, the GradScaler's scale removed), so
    ``gradient_norms_from(critic(x), x)`` equals ``gradient_norms(critic, x)``. The graph of
    ``outputs`` is kept, so the loss can still be backpropagated through it.

    With ``backend="fd"`` and the ``critic``, nothing is differentiated twice: the norm is the exact
    first-order one and its parameter gradient comes from the critic at :math:`x \pm h u`
    (:class:`FiniteDifference`), so R1 from the loss's forward runs on fused attention kernels and
    under FSDP2. The critic must then give the same function in every forward: one that draws random
    numbers (dropout) or writes buffers (spectral normalisation in training mode) is refused, since
    the loss's forward cannot be replayed; use :func:`r1_penalty` with ``backend="fd"``, which runs
    all of its forwards itself.

    .. warning::
        Row :math:`i` is the gradient of sample :math:`i`'s outputs with respect to all of
        ``inputs``, summed over the batch. It is sample :math:`i`'s own gradient only if the samples
        do not interact in the forward (BatchNorm in training mode, minibatch standard deviation,
        attention across the batch). Pass ``critic`` to have that checked (a warning; ``fd`` refuses
        such a critic): without it, the critic is not seen.

    Args:
        outputs (Tensor): the critic's scores for the batch, :math:`(N,)`, :math:`(N, 1)` or
            :math:`(N, \dots)` (summed per sample), still attached to their graph.
        inputs (Tensor or tuple of Tensors): the batch (or batches, for a multi-input critic) the
            critic was called on: leaves that require grad, made before the forward with
            ``x = x.detach().requires_grad_(True)``.
        critic (Callable, optional): the critic that gave ``outputs``, called as
            ``critic(*inputs, *critic_args, **critic_kwargs)``. Needed by ``backend="fd"``; with
            ``"autograd"`` it makes the checks (batch coupling, ops without a double backward) run once
            per critic instead of on every call. Default: ``None``.
        backend (str or FiniteDifference, optional): ``"autograd"`` (a double backward through
            ``outputs``' graph) or ``"fd"``. Default: ``"autograd"``.
        critic_args (tuple, optional): the critic's extra arguments, as in :func:`gradient_norms`
            (per-sample tensors are constants). Default: ``()``.
        critic_kwargs (dict, optional): the critic's extra keyword arguments. Default: ``None``.
        scaler (torch.amp.GradScaler, optional): the GradScaler of an fp16 AMP loop. The input
            gradient is seeded with :math:`\min(S/N, 2^{10})` for the current scale :math:`S`, rounded
            down to a power of two, and the norm divided by the same number: small fp16 gradients do not
            underflow, the seed never overflows fp16 (:math:`S = 2^{16}` would), and the result is the
            unscaled one. Default: ``None``.
        create_graph (bool, optional): make the norms differentiable with respect to the critic's
            parameters (for a penalty). ``False`` for logging only. Default: ``True``.

    Returns:
        Tensor: norms of shape :math:`(N,)`, float32 or wider.

    Raises:
        TypeError: if ``outputs`` or ``inputs`` are not floating-point tensors.
        ValueError: if ``inputs`` are not leaves that require grad, ``outputs`` are not attached to
            them (a forward under ``torch.no_grad()``, detached outputs, a leaf made after the forward,
            the arguments swapped), ``outputs`` has no leading batch dimension N (e.g. after
            ``.mean()``), ``backend="fd"`` is given without ``critic``, or the critic couples the
            samples (``fd``).
        UnsupportedCriticError: with ``"autograd"`` for an op without a double backward in the graph
            (a fused attention kernel, ``@once_differentiable``); with ``"fd"`` for a critic with kinks,
            or one that is random or writes buffers.

    Example::

        >>> critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
        >>> real = torch.randn(8, 3, 4).requires_grad_(True)
        >>> d_real = critic(real)  # one forward for the loss and the penalty
        >>> r1 = gradpen.gradient_norms_from(d_real, real).square().mean()
        >>> loss_d = torch.nn.functional.softplus(-d_real).mean() + (10.0 / 2) * r1
        >>> loss_d.backward()
        >>> torch.allclose(r1, critic[1].weight.square().sum())  # a linear critic: ||w||^2
        True
    """
    xs = as_inputs(inputs, "inputs")
    n = xs[0].shape[0]
    out = check_critic_output(outputs, n, "outputs")
    _check_leaves(out, xs)
    create_graph = check_bool(create_graph, "create_graph")
    fd = _fd_of(backend)
    call = None
    if critic is not None:
        check_critic(critic)
        call = resolve_critic_args(critic_args, critic_kwargs, n)
    elif fd is not None:
        raise ValueError(
            "backend='fd' needs the `critic` that gave `outputs`: it evaluates the critic near `inputs`. "
            "Pass gradient_norms_from(outputs, inputs, critic=critic, backend='fd')."
        )
    elif critic_args or critic_kwargs:
        raise ValueError("`critic_args`/`critic_kwargs` are the critic's arguments: pass them with `critic`.")
    seed = _seed(scaler, n, xs[0])
    with _grad_mode(create_graph):
        if fd is not None and create_graph and critic is not None:
            return _grad_norms(_fd_grads_from(out, xs, seed, critic, call, fd), seed)
        return _grad_norms(_grads_from(out, xs, seed, create_graph and fd is None, critic, call), seed)


def _fd_of(backend: Any) -> FiniteDifference | None:
    """The FiniteDifference settings of ``backend`` for gradient_norms_from; None for ``"autograd"``."""
    grads_of = resolve_backend(backend)
    if isinstance(grads_of, FiniteDifference):
        return grads_of
    if backend != "autograd":
        raise ValueError(
            f"gradient_norms_from takes backend='autograd' or 'fd', got {backend!r}: backend='func' runs a "
            "forward of its own, which gradpen.gradient_norms(critic, inputs, backend='func') does."
        )
    return None


def _check_leaves(out: Tensor, xs: tuple[Tensor, ...]) -> None:
    """``inputs`` must be leaves that require grad, and ``outputs`` must have been computed from them."""
    swapped = (
        " Are the arguments swapped? The order is gradient_norms_from(outputs, inputs)."
        if out.grad_fn is None and out.requires_grad and xs[0].grad_fn is not None
        else ""
    )
    for i, x in enumerate(xs):
        label = "inputs" if len(xs) == 1 else f"inputs[{i}]"
        if not x.requires_grad:
            raise ValueError(
                f"`{label}` does not require grad, so the critic's gradient with respect to it was not "
                "recorded. Make the batch a leaf before the forward: x = x.detach().requires_grad_(True), "
                f"then outputs = critic(x).{swapped}"
            )
        if x.grad_fn is not None:
            raise ValueError(
                f"`{label}` is not a leaf: it was computed from other tensors (the generator's output?), so the "
                "penalty's gradient would flow back into them. Make the batch a leaf before the forward: "
                f"x = x.detach().requires_grad_(True), then outputs = critic(x).{swapped}"
            )
    if not out.requires_grad:
        raise ValueError(
            "`outputs` are not attached to a graph: the forward ran under torch.no_grad() or "
            "torch.inference_mode(), or they were detached. Run the critic with grad enabled on `inputs`."
        )


def _grads_from(
    out: Tensor,
    xs: tuple[Tensor, ...],
    seed: Tensor | None,
    create_graph: bool,
    critic: Critic | None,
    call: Any,
) -> tuple[Tensor, ...]:
    """The seeded input gradients of ``out`` (autograd), with the checks: the outputs reach the inputs,
    batch coupling (with a critic), and ops without a double backward (``create_graph``)."""
    if critic is not None:
        warn_if_coupled(critic, out, xs, stacklevel=4)
    check = create_graph and not graph_checked(critic)
    watch = FunctionWatch(out, xs) if check else None
    grad_out = torch.ones_like(out) if seed is None else seed.to(out.dtype).expand_as(out)
    raw = torch.autograd.grad(out, xs, grad_out, create_graph=create_graph, retain_graph=True, allow_unused=True)
    if all(g is None for g in raw):
        raise ValueError(
            "`outputs` were not computed from `inputs`: no path in the graph leads from one to the other. "
            "Likely causes: the leaf was made after the forward (x.requires_grad_() after outputs = critic(x)), "
            "or the critic was called on another tensor (a copy, x.detach(), a cast). Make the leaf first: "
            "x = x.detach().requires_grad_(True); outputs = critic(x)."
        )
    grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(raw, xs, strict=True))
    if check:
        try:
            check_graph(critic, out, xs, grads, watch)
        except UnsupportedCriticError as e:
            raise UnsupportedCriticError(
                f"{e} From the loss's forward: gradient_norms_from(outputs, inputs, critic=critic, backend='fd'), "
                "or run that forward under torch.nn.attention.sdpa_kernel(SDPBackend.MATH) for fused attention."
            ) from None
    return grads


def _fd_grads_from(
    out: Tensor, xs: tuple[Tensor, ...], seed: Tensor | None, critic: Critic, call: Any, fd: FiniteDifference
) -> tuple[Tensor, ...]:
    """fd from the loss's forward: the exact gradient of ``out``, its parameter dependence from forwards
    of ``critic`` at ``x + h u`` (and ``x - h u``), which must run the function that gave ``out``."""
    detached = tuple(x.detach() for x in xs)
    check_fd_critic(critic, detached, call, fd)
    refuse_if_coupled(critic, lambda: batch_coupled(critic, out, xs), "fd")
    base = fd.scheme == "forward"
    grads = _grads_from(out, xs, seed, False, None, None)
    replay = Replay(critic, xs[0].device)
    at_x = out.reshape(out.shape[0], -1).sum(1, dtype=torch.promote_types(out.dtype, torch.float32))
    dd = directional_derivative(critic, call, detached, grads, seed, fd, replay, at_x if base else None)
    if replay.drew_random or replay.wrote_buffers:
        replay.restore()
        what = "draws random numbers (dropout)" if replay.drew_random else "writes buffers (spectral norm, BatchNorm)"
        raise UnsupportedCriticError(
            f"gradient_norms_from(..., backend='fd') cannot use this critic: its forward {what}, so the forwards "
            "near `inputs` would not run the function that gave `outputs`, and the loss's forward cannot be "
            "replayed. Use gradpen.r1_penalty(critic, real, backend='fd') (or r2_penalty), which runs every "
            "forward itself from the same RNG state and buffers."
        )
    return along_gradient(grads, seed, dd)
