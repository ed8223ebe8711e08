"""Several forwards of one critic that must all see the same critic.

The finite-difference estimators (:mod:`gradpen._approx`) and the ``fd`` backend
(:mod:`gradpen._backends`) compare the critic at nearby points. That comparison is only meaningful if
every forward runs the same function: the same dropout masks, the same BatchNorm mode, and the same
buffer values (spectral normalisation updates its power-iteration vectors ``u``/``v`` in every
training-mode forward, which changes the weight the next forward uses).

Two ways to get that, both here:

- :func:`can_fuse`: one forward over the points concatenated, when the visible modules say that is the
  same as one forward per point (no random layer, nothing that mixes the rows of a batch);
- :class:`Replay`: otherwise one forward per point, each started from the global RNG state and the
  buffer values of the first forward, and afterwards the RNG and buffers are left where that first
  forward left them, as if the critic had run once.

What cannot be replayed: state a forward changes outside the module's buffers (a Python attribute, a
global variable, a counter in a closure), and the buffers of modules gradpen cannot see (a module read
as a global variable by a function; see :func:`gradpen._guards.critic_modules`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradpen._guards import critic_modules


def mixes_branches(m: nn.Module) -> bool:
    """Whether ``m`` would make one forward over stacked copies differ from separate forwards."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.training or not m.track_running_stats
    if not m.training:
        return False
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0
    return isinstance(m, nn.RReLU)


def can_fuse(critic: Any) -> bool:
    """One forward over all points is equivalent to one forward per point: the modules behind the critic
    are visible and none of them is random in training mode or mixes the rows of a batch."""
    roots = critic_modules(critic)
    return bool(roots) and not any(mixes_branches(m) for root in roots for m in root.modules())


def _has_rng(device: torch.device) -> bool:
    return device.type not in ("cpu", "meta")


def rng_state(device: torch.device) -> list[Tensor]:
    """The global RNG states a critic on ``device`` can draw from: the CPU's, and the accelerator's."""
    states = [torch.get_rng_state()]
    if _has_rng(device):
        states.append(torch.get_device_module(device).get_rng_state(device))
    return states


def set_rng_state(device: torch.device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if _has_rng(device):
        torch.get_device_module(device).set_rng_state(states[1], device)


def _same_rng(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


class _Buffer:
    """One buffer of a visible module: where it lives, the tensor, its version and value before the first forward."""

    __slots__ = ("after", "before", "module", "name", "tensor", "version")

    def __init__(self, module: nn.Module, name: str, tensor: Tensor) -> None:
        self.module, self.name, self.tensor = module, name, tensor
        self.version, self.before = tensor._version, tensor.detach().clone()
        self.after: Tensor | None = None  # the value the first forward left (for a written buffer)

    def written(self) -> bool:
        return self.module._buffers.get(self.name) is not self.tensor or self.tensor._version != self.version

    def put(self, value: Tensor) -> None:
        current = self.module._buffers.get(self.name)
        if current is None or current.shape != value.shape or current.dtype != value.dtype:
            self.module._buffers[self.name] = value.clone()
        else:
            with torch.no_grad():
                current.copy_(value)


class Replay:
    """Replay the critic's state for the second and later of several forwards.

    Built just before the first forward: it saves the global RNG state (CPU and ``device``'s
    accelerator) and a copy of every buffer of the visible modules. Call :meth:`rewind` before and
    :meth:`done` after every forward, and :meth:`finish` at the end, which leaves the RNG and the
    buffers as the first forward left them (or :meth:`restore`, as they were before it). Inside a
    ``torch.compile`` region, ``torch.get_rng_state`` is a graph break (an error with ``fullgraph=True``).

    Buffers are compared by their version counters, so a critic whose forward writes no buffer pays
    for one copy of its buffers and nothing else; a critic without buffers pays nothing.
    """

    def __init__(self, critic: Any, device: torch.device) -> None:
        self.device = device
        self.rng_before = rng_state(device)
        self.rng_after: list[Tensor] = []
        self.buffers = [
            _Buffer(m, name, b)
            for root in critic_modules(critic)
            for m in root.modules()
            for name, b in m._buffers.items()
            if b is not None
        ]
        self.written: list[_Buffer] = []
        self.started = False  # the first forward has run

    def done(self) -> None:
        """Call after every forward: the first call records the state the first forward left behind;
        later ones do nothing."""
        if self.started:
            return
        self.started = True
        self.rng_after = rng_state(self.device)
        self.written = [b for b in self.buffers if b.written()]
        for b in self.written:
            b.after = b.module._buffers[b.name].detach().clone()

    @property
    def drew_random(self) -> bool:
        """The first forward drew from the global RNG (a random layer, seen or not)."""
        return self.started and not _same_rng(self.rng_before, self.rng_after)

    @property
    def wrote_buffers(self) -> bool:
        """The first forward changed a buffer (spectral norm's power iteration, BatchNorm statistics)."""
        return bool(self.written)

    def rewind(self) -> None:
        """Put the RNG and the written buffers back to their values before the first forward (before it
        has run: nothing to do)."""
        if not self.started:
            return
        if self.drew_random:
            set_rng_state(self.device, self.rng_before)
        for b in self.written:
            b.put(b.before)

    def restore(self) -> None:
        """Put the RNG and every written buffer back to where they were before the first forward, as
        if the critic had not run (the probes, and a refusal after the forwards)."""
        if not self.started:
            return
        set_rng_state(self.device, self.rng_before)
        for b in self.written:
            b.put(b.before)

    def finish(self) -> None:
        """Leave the RNG and the buffers as the first forward left them."""
        if not self.started:
            return
        set_rng_state(self.device, self.rng_after)
        for b in self.written:
            if b.after is not None:
                b.put(b.after)
