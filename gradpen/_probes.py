"""What the critic does, found by running it: once per critic, on a few samples of the first batch.

Two properties decide whether a backend's answer is the one the user asked for, and neither can be
read off the module types:

- **batch coupling** (:func:`batch_coupled`): does a sample's score depend on the other samples of the
  batch? Minibatch standard deviation (StyleGAN2), batch statistics written by hand and attention
  across the batch do that, as BatchNorm in training mode does. The per-sample gradient is then not
  defined: ``autograd`` gives the gradient of the batch sum (StyleGAN2's R1), ``func`` a gradient with
  the other samples removed, which is neither. Read off the graph of a batch forward (one backward of
  one sample's score), so it costs no forward where the backend runs a batch forward anyway.
- **kinks** (:func:`kink_ratio`): is the input gradient continuous along the ``fd`` step? A
  piecewise-linear critic (ReLU, LeakyReLU, max-pooling, ``torch.maximum`` in a forward) has an input
  gradient that jumps, and a finite difference across a jump gives a wrong parameter gradient.

A probe that runs the critic does so on at most a few samples, with every forward seeing the same
critic (:class:`gradpen._forwards.Replay`), and restores the RNG and the buffers afterwards, so it
leaves no trace. Results are cached by :func:`gradpen._guards.critic_key`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradpen._args import CriticCall
from gradpen._checks import check_critic_output
from gradpen._forwards import Replay
from gradpen._guards import CriticCache

# Samples each probe uses (the first ones of the batch).
COUPLING_SAMPLES = 4
KINK_SAMPLES = 16
# The relative change of the finite-difference Hessian-vector product between the step h and h/2 above
# which the input gradient is taken to jump along the step. Measured (float32, step 0.025 RMS): smooth
# critics (SiLU, GELU, Softplus, Tanh MLPs and conv nets, attention) 3e-5 to 1e-3, ELU 7e-3 to 1.2e-2,
# Softplus(beta=100) 1.4e-2; ReLU, LeakyReLU and max-pooling critics 0.39 to 0.48.
KINK_TOL = 0.1
# The relative step of the kink probe: the float32 step of the fd backend (5 * eps**(1/3)), in every
# dtype, so that the probe crosses the kinks a float32 or low-precision step would cross.
KINK_STEP = 5 * torch.finfo(torch.float32).eps ** (1 / 3)

_coupling = CriticCache()
_kinks = CriticCache()


def _cached(cache: CriticCache, critic: Any, measure: Callable[[], Any], key: tuple[Any, ...] | None = None) -> Any:
    """The cached result for this critic (``key``: its critic key, if known), or ``measure()`` (cached
    unless it is ``None``)."""
    found, value = cache.lookup(critic, key)
    if found:
        return value
    value = measure()
    if value is not None:
        cache.set(critic, value)
    return value


def _rms(xs: tuple[Tensor, ...]) -> Tensor:
    """Per-sample root mean square over all elements of all inputs, float32 or wider, shape (N,)."""
    wide = torch.promote_types(xs[0].dtype, torch.float32)
    sq = sum(x.detach().reshape(x.shape[0], -1).to(wide).square().sum(1) for x in xs)
    count = sum(x[0].numel() for x in xs)
    return (sq / max(count, 1)).sqrt()


def coupled_in_graph(out: Tensor, leaves: tuple[Tensor, ...]) -> bool | None:
    """Whether sample 0's score depends on another sample's inputs, read off the graph of a batch
    forward: one backward of sample 0's summed output (the graph is kept). Rows of a per-sample critic
    get exact zeros (a matmul's backward multiplies zero rows); ``None`` for a batch of one sample, a
    constant output or non-finite gradients."""
    n = out.shape[0]
    if n < 2 or not out.requires_grad:
        return None
    first = out.reshape(n, -1)[0].sum()
    grads = torch.autograd.grad(first, leaves, retain_graph=True, allow_unused=True)
    others = [g[1:] for g in grads if g is not None]
    if any(bool((g.ne(0) & g.isfinite()).any()) for g in others):
        return True
    # A per-sample critic gives exact zeros, or NaN where its weights are inf or NaN (0 * inf, a diverged
    # step): NaN alone says nothing about coupling and must not stick to the critic. Unknown then, and
    # probed again at the next call.
    return None if not all(bool(g.isfinite().all()) for g in others) else False


def batch_coupled(critic: Any, out: Tensor, leaves: tuple[Tensor, ...], key: tuple[Any, ...] | None = None) -> bool:
    """:func:`coupled_in_graph`, once per critic key (``key``, if known; ``critic=None``: every time)."""
    if torch.compiler.is_compiling() or leaves[0].is_meta:
        return False
    if critic is None:
        return bool(coupled_in_graph(out, leaves))
    return bool(_cached(_coupling, critic, lambda: coupled_in_graph(out, leaves), key))


def known_uncoupled(critic: Any, key: tuple[Any, ...] | None = None) -> bool:
    """:func:`batch_coupled` has run for this critic (by key) and found its samples independent."""
    return _coupling.get(critic, key=key) is False


def batch_coupled_by_forward(
    critic: Any, inputs: tuple[Tensor, ...], call: CriticCall, key: tuple[Any, ...] | None = None
) -> bool:
    """:func:`batch_coupled` for a backend that has no batch forward of its own (func): one forward of
    the first (up to) four samples, from and back to the same RNG state and buffers."""
    if torch.compiler.is_compiling() or inputs[0].device.type == "meta":
        return bool(_coupling.get(critic, False, key))
    found, value = _coupling.lookup(critic, key)
    if found:
        return bool(value)
    m = min(inputs[0].shape[0], COUPLING_SAMPLES)
    if m < 2:
        return False
    leaves = tuple(x[:m].detach().requires_grad_(True) for x in inputs)
    replay = Replay(critic, leaves[0].device)
    try:
        with torch.enable_grad():
            out = check_critic_output(call.with_rows(tuple(r[:m] for r in call.rows()))(critic, *leaves), m)
            replay.done()
            return batch_coupled(critic, out, leaves)
    finally:
        replay.restore()


def kink_ratio(critic: Any, inputs: tuple[Tensor, ...], call: CriticCall) -> float | None:
    """The relative change of the finite-difference Hessian-vector product of the first (up to) 16
    samples between the step :data:`KINK_STEP` and half of it, along each sample's input gradient
    (cached per critic key). Smooth critics give 1e-3 or less, kinked ones about 0.4.

    Runs with autocast off, so that rounding in a low-precision dtype is not read as a kink.
    """
    if torch.compiler.is_compiling() or inputs[0].device.type == "meta":
        return 0.0

    def measure() -> float | None:
        m = min(inputs[0].shape[0], KINK_SAMPLES)
        xs = tuple(x[:m].detach() for x in inputs)
        part = call.with_rows(tuple(r[:m] for r in call.rows()))
        replay = Replay(critic, xs[0].device)
        wide = torch.promote_types(xs[0].dtype, torch.float32)

        def grad_at(points: tuple[Tensor, ...]) -> Tensor:
            leaves = tuple(p.detach().requires_grad_(True) for p in points)
            out = check_critic_output(part(critic, *leaves), m)
            if not out.requires_grad:
                return torch.zeros(m, sum(x[0].numel() for x in xs), device=xs[0].device, dtype=wide)
            grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
            flat = [(torch.zeros_like(x) if g is None else g).reshape(m, -1) for g, x in zip(grads, xs, strict=True)]
            return torch.cat(flat, 1).to(wide)

        def grad_again(points: tuple[Tensor, ...]) -> Tensor:
            replay.rewind()
            return grad_at(points)

        device_type = xs[0].device.type
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            g = grad_at(xs)
            replay.done()
            norms = g.norm(dim=1, keepdim=True)
            u = torch.where(norms > 0, g / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(g))
            rms = _rms(xs)
            h = (KINK_STEP * torch.where(rms > 0, rms, torch.ones_like(rms)))[:, None]

            def along(t: Tensor) -> tuple[Tensor, ...]:
                out, offset = [], 0
                for x in xs:
                    k = x[0].numel()
                    out.append((x.reshape(m, -1) + t * u[:, offset : offset + k]).reshape(x.shape).to(x.dtype))
                    offset += k
                return tuple(out)

            full = (grad_again(along(h)) - grad_again(along(-h))) / (2 * h)
            half = (grad_again(along(h / 2)) - grad_again(along(-h / 2))) / h
        replay.restore()
        size = full.norm() + half.norm()
        if not bool(size > 0):  # a linear critic: no curvature, no kink
            return 0.0
        return float((full - half).norm() / size)

    return _cached(_kinks, critic, measure)
