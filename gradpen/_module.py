"""GradientPenalty: a thin stateful face over the functional interface.

All the math lives in :mod:`gradpen._penalty`. The module holds the settings (validated when it is
built), the call counter of lazy regularisation, and the last norms for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradpen._backends import FiniteDifference, resolve_backend
from gradpen._checks import as_inputs, check_bool, check_choice, check_int, check_number
from gradpen._penalty import (
    Critic,
    Inputs,
    dragan_penalty,
    gradient_penalty,
    r1_penalty,
    r2_penalty,
    wgan_div_penalty,
)

# kind -> (which inputs it uses, whether center/one_sided apply, the call)
_Call = Callable[["GradientPenalty", Critic, Any, Any, dict[str, Any]], Any]
KINDS: dict[str, tuple[tuple[str, ...], bool, _Call]] = {
    "wgan-gp": (("real", "fake"), True, lambda m, c, r, f, kw: gradient_penalty(c, r, f, m.center, m.one_sided, **kw)),
    "r1": (("real",), False, lambda m, c, r, f, kw: r1_penalty(c, r, **kw)),
    "r2": (("fake",), False, lambda m, c, r, f, kw: r2_penalty(c, f, **kw)),
    "dragan": (("real",), True, lambda m, c, r, f, kw: dragan_penalty(c, r, m.center, m.one_sided, **kw)),
    "wgan-div": (("real", "fake"), False, lambda m, c, r, f, kw: wgan_div_penalty(c, r, f, **kw)),
}


class GradientPenalty(nn.Module):
    r"""Weighted gradient penalty with optional lazy regularisation.

    Calling it as ``gp(critic, real, fake, **kwargs)`` returns ``weight * penalty``, where the
    penalty is the functional of ``kind`` (:func:`~gradpen.gradient_penalty` by default) called with
    the module's settings and ``kwargs`` (any keyword of that functional, e.g. ``critic_args`` or
    ``scaler``).

    With ``every=k > 1`` it is the lazy regularisation of StyleGAN2 (Karras et al., 2020): the
    penalty is computed on the first call and every k-th call after it, multiplied by k so that
    its average weight is unchanged; the other calls return a zero and cost nothing.

    .. math::
        \text{out}_t = \begin{cases} k\,\lambda\,\mathcal{P}_t & t \equiv 0 \pmod k \\
        0 & \text{otherwise} \end{cases}

    Args:
        weight (float, optional): :math:`\lambda \ge 0`. Default: ``10.0`` (the WGAN-GP paper).
        center (float, optional): target norm for ``"wgan-gp"`` and ``"dragan"``. Default: ``1.0``.
        one_sided (bool, optional): one-sided penalty, for ``"wgan-gp"`` and ``"dragan"``. Default: ``False``.
        kind (str, optional): ``"wgan-gp"``, ``"r1"`` (uses ``real``), ``"r2"`` (uses ``fake``),
            ``"dragan"`` (uses ``real``) or ``"wgan-div"``. Default: ``"wgan-gp"``.
        backend (str or FiniteDifference, optional): ``"autograd"``, ``"func"`` or ``"fd"`` (or a
            :class:`~gradpen.FiniteDifference` with its settings). Default: ``"autograd"``.
        every (int, optional): apply the penalty on one call in ``every``. Default: ``1``.

    Attributes:
        last_norms (Tensor or None): the detached per-sample norms of the last computed penalty.
        calls (int): how many times the module was called; saved in ``state_dict()``.

    Raises:
        ValueError: if ``weight < 0``, ``every < 1``, ``center < 0``, ``kind`` or ``backend`` is
            unknown, or ``center``/``one_sided`` are set for a kind that has no such option.
        TypeError: if an option has the wrong type.

    Example::

        >>> critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
        >>> gp = gradpen.GradientPenalty(weight=10.0, every=4)
        >>> real, fake = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
        >>> [round(gp(critic, real, fake).item(), 4) > 0 for _ in range(5)]
        [True, False, False, False, True]
        >>> gp.last_norms.shape
        torch.Size([8])
    """

    last_norms: Tensor | None

    def __init__(
        self,
        weight: float = 10.0,
        center: float = 1.0,
        one_sided: bool = False,
        *,
        kind: str = "wgan-gp",
        backend: str | FiniteDifference = "autograd",
        every: int = 1,
    ) -> None:
        super().__init__()
        self.weight = check_number(weight, "weight", low=0.0)
        self.center = check_number(center, "center", low=0.0)
        self.one_sided = check_bool(one_sided, "one_sided")
        check_choice(kind, "kind", KINDS)
        resolve_backend(backend)
        self.kind, self.backend = kind, backend
        self.every = check_int(every, "every", low=1)
        if not KINDS[kind][1] and (self.center != 1.0 or one_sided):
            raise ValueError(f"`center` and `one_sided` do not apply to kind={kind!r}; leave them at their defaults.")
        self.calls = 0
        self.last_norms = None

    def forward(self, critic: Critic, real: Inputs | None, fake: Inputs | None, **kwargs: Any) -> Tensor:
        """Return ``weight * every * penalty`` on an active call, a zero otherwise."""
        if "return_norms" in kwargs or "backend" in kwargs:
            raise TypeError(
                "GradientPenalty sets `backend` and `return_norms` itself; read the norms from `.last_norms`."
            )
        uses, _, call = KINDS[self.kind]
        given = {"real": real, "fake": fake}
        for name in uses:
            if given[name] is None:
                raise ValueError(f"kind={self.kind!r} needs `{name}`, got None.")
        if not self._active():
            self._count()
            like = as_inputs(given[uses[0]], uses[0])[0]
            shape = (like.shape[0],) if kwargs.get("reduction") == "none" else ()
            dtype = torch.promote_types(like.dtype, torch.float32)
            # A leaf that requires grad: a separate `pen(...).backward()` runs on skipped calls too.
            return torch.zeros(shape, device=like.device, dtype=dtype, requires_grad=True)
        penalty, norms = call(self, critic, real, fake, {"backend": self.backend, "return_norms": True, **kwargs})
        self._count()  # only once the penalty exists: a call that raised (OOM, a retry) keeps its turn
        self.last_norms = norms.detach()
        return penalty * (self.weight * self.every)

    # The counter lives outside torch.compile's graph: a compiled step that read it would guard on
    # its value and recompile on every call. Disabled, the step compiles one graph per branch.
    @torch.compiler.disable
    def _active(self) -> bool:
        return self.calls % self.every == 0

    @torch.compiler.disable
    def _count(self) -> None:
        self.calls += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, center={self.center}, one_sided={self.one_sided}, "
            f"kind={self.kind!r}, backend={self.backend!r}, every={self.every}"
        )


def lazy_adam_kwargs(lr: float, betas: tuple[float, float], every: int) -> dict[str, Any]:
    r"""Adam's ``lr`` and ``betas`` corrected for lazy regularisation, as StyleGAN2 does.

    .. versionadded:: 0.2

    With the penalty applied as its own optimizer step once every :math:`k` main steps, the
    optimizer takes :math:`k + 1` steps where a non-lazy run takes :math:`k`. StyleGAN2
    (Karras et al., 2020, Appendix B; ``training/training_loop.py`` of StyleGAN2-ADA, where
    the ratio is called ``mb_ratio``) keeps the per-step dynamics by scaling with
    :math:`c = k / (k + 1)`:

    .. math::
        \mathrm{lr}' = c\,\mathrm{lr}, \qquad \beta_1' = \beta_1^{\,c}, \quad \beta_2' = \beta_2^{\,c}

    Use it for the optimizer of the network whose penalty is lazy (the discriminator for R1,
    the generator for path-length regularisation). ``every=1`` returns the settings unchanged.

    Args:
        lr (float): the learning rate of the non-lazy schedule, :math:`> 0`.
        betas (tuple of float): Adam's :math:`(\beta_1, \beta_2)`, each in :math:`[0, 1)`.
        every (int): the lazy interval :math:`k \ge 1` (StyleGAN2: 16 for R1).

    Returns:
        dict: ``{"lr": lr', "betas": (beta1', beta2')}``, to pass as ``torch.optim.Adam(params, **kwargs)``.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if ``lr <= 0``, a beta is outside :math:`[0, 1)`, or ``every < 1``.

    Example::

        >>> kwargs = gradpen.lazy_adam_kwargs(0.0025, (0.0, 0.99), every=16)  # StyleGAN2's D
        >>> round(kwargs["lr"], 6), [round(b, 6) for b in kwargs["betas"]]
        (0.002353, [0.0, 0.990585])
        >>> opt_d = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), **kwargs)
    """
    lr = check_number(lr, "lr", low=0.0, strict=True)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"`betas` must be a pair (beta1, beta2), got {betas!r}.")
    b1, b2 = (check_number(b, f"betas[{i}]", low=0.0) for i, b in enumerate(betas))
    for i, b in enumerate((b1, b2)):
        if b >= 1.0:
            raise ValueError(f"`betas[{i}]` must be < 1, got {b:g}.")
    every = check_int(every, "every", low=1)
    c = every / (every + 1) if every > 1 else 1.0
    return {"lr": lr * c, "betas": (b1**c, b2**c)}
