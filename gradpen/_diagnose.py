r"""A check a user runs on their own critic: do the backends agree on it?

Some critics are wrong on one backend without any error gradpen can raise: a custom
``torch.autograd.Function`` whose backward leaves autograd (NumPy, an extension kernel) loses its
second-order terms on ``autograd``; a layer that mixes the samples in a way no probe caught gives
``func`` another gradient. The three backends reach the penalty's parameter gradient in three
independent ways (a double backward, ``vmap`` over ``grad``, a finite difference of first-order
passes), so where two of them agree and the third does not, the third is the one to distrust.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradpen._checks import as_inputs, check_critic
from gradpen._forwards import Replay, set_rng_state
from gradpen._guards import critic_modules
from gradpen._penalty import Critic, Inputs, r1_penalty


@dataclass
class BackendComparison:
    """What :func:`compare_backends` found.

    .. versionadded:: 0.3

    Attributes:
        values (dict): backend -> the R1 value (a float), for the backends that ran.
        grads (dict): backend -> the R1 parameter gradient, one flat float64 vector.
        errors (dict): backend -> the error message, for the backends that refused the critic.
        warnings (dict): backend -> the warnings it raised (batch coupling, BatchNorm).
    """

    values: dict[str, float] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    def difference(self, a: str, b: str) -> float:
        """The relative difference of the parameter gradients of backends ``a`` and ``b``:
        :math:`\\lVert g_a - g_b \\rVert / \\max(\\lVert g_a \\rVert, \\lVert g_b \\rVert)`."""
        ga, gb = self.grads[a], self.grads[b]
        size = max(ga.norm().item(), gb.norm().item())
        return (ga - gb).norm().item() / size if size > 0 else 0.0

    def agree(self, tol: float = 1e-3) -> bool:
        """Every pair of backends that ran agrees to ``tol`` (relative; fd's float32 error is below 2e-3
        on smooth critics, so use ``tol=5e-3`` in float32, ``1e-6`` in float64)."""
        names = sorted(self.grads)
        return all(self.difference(a, b) <= tol for i, a in enumerate(names) for b in names[i + 1 :])

    def __str__(self) -> str:
        names = sorted(self.grads)
        lines = [f"{'backend':10s} {'R1':>12s}  " + "  ".join(f"vs {b:8s}" for b in names)]
        for a in names:
            diffs = "  ".join(f"{self.difference(a, b):11.2e}" for b in names)
            lines.append(f"{a:10s} {self.values[a]:12.6g}  {diffs}")
        lines += [f"{a:10s} refused: {msg.splitlines()[0][:160]}" for a, msg in sorted(self.errors.items())]
        lines += [f"{a:10s} warned: {w[:160]}" for a, ws in sorted(self.warnings.items()) for w in ws]
        return "\n".join(lines)


def compare_backends(
    critic: Critic,
    inputs: Inputs,
    *,
    backends: Sequence[Any] = ("autograd", "func", "fd"),
    critic_args: Sequence[Any] = (),
    critic_kwargs: dict[str, Any] | None = None,
) -> BackendComparison:
    r"""Compute R1 at ``inputs`` with each backend and compare the parameter gradients.

    .. versionadded:: 0.3

    .. math::
        R_1 = \mathbb{E}_i \lVert \nabla_{x_i} D(x_i) \rVert_2^2

    Every backend starts from the same RNG state and buffer values, and the critic is left as it was
    (its ``.grad`` untouched). Run it once on a batch of your data when you build a critic; where two
    backends agree and one does not, the odd one out is wrong for this critic. A backend that refuses
    the critic (kinks for ``fd``, an op without a double backward for the exact ones) is reported with
    its reason, not raised.

    Args:
        critic (Callable): the critic, whose parameters are found in the modules behind it.
        inputs (Tensor or tuple of Tensors): a batch :math:`(N, *)` (a tuple for a multi-input critic).
        backends (sequence, optional): the backends to compare. Default: ``("autograd", "func", "fd")``.
        critic_args (tuple, optional): as in :func:`gradient_norms`. Default: ``()``.
        critic_kwargs (dict, optional): as in :func:`gradient_norms`. Default: ``None``.

    Returns:
        BackendComparison: values, gradients, refusals and warnings per backend; ``str()`` of it is a table.

    Raises:
        ValueError: if no module with parameters that require grad can be found behind the critic.

    Example::

        >>> nn = torch.nn
        >>> critic = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        >>> report = gradpen.compare_backends(critic, torch.randn(8, 4).double())
        >>> report.agree(tol=1e-6)
        True
    """
    check_critic(critic)
    xs = as_inputs(inputs, "inputs")
    params = [p for m in critic_modules(critic) for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "compare_backends needs the critic's parameters, found in the modules behind it (an nn.Module, "
            "or one in a partial, a bound method, a closure or a callable object); none that requires grad was "
            "found."
        )
    report = BackendComparison()
    state = Replay(critic, xs[0].device)  # every backend starts from the RNG state and buffers of now
    saved = [p.grad for p in params]
    try:
        for backend in backends:
            name = backend if isinstance(backend, str) else repr(backend)
            state.rewind()
            set_rng_state(xs[0].device, state.rng_before)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    r1 = r1_penalty(critic, xs, backend=backend, critic_args=critic_args, critic_kwargs=critic_kwargs)
                    grads = torch.autograd.grad(r1, params, allow_unused=True)
                except (RuntimeError, ValueError) as e:
                    report.errors[name] = str(e)
                    continue
                finally:
                    state.done()
            report.values[name] = r1.item()
            report.grads[name] = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
            if caught:
                report.warnings[name] = [str(w.message) for w in caught]
    finally:
        state.restore()
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    return report
