"""Validation shared by the public functions.

Every check raises ``TypeError`` or ``ValueError`` with a message that names the argument,
says what was expected and echoes what was got. None of them reads tensor values, so none
of them synchronises with the device, except :func:`check_alpha` on a user-given ``alpha``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def _type_name(value: Any) -> str:
    """``float``, ``str``; qualified for other libraries' types (``numpy.bool``, ``numpy.float32``)."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__name__}"


def as_inputs(x: Any, name: str) -> tuple[Tensor, ...]:
    """Normalise ``x`` (a tensor or a tuple/list of tensors) to a non-empty tuple of batches."""
    if isinstance(x, Tensor):
        xs: tuple[Any, ...] = (x,)
    elif isinstance(x, (tuple, list)) and len(x) > 0:
        xs = tuple(x)
    else:
        raise TypeError(f"`{name}` must be a Tensor or a non-empty tuple of Tensors, got {_type_name(x)}.")
    for i, t in enumerate(xs):
        label = name if len(xs) == 1 else f"{name}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"`{label}` must be a Tensor, got {_type_name(t)}.")
        if not t.is_floating_point():
            raise TypeError(f"`{label}` must have a floating-point dtype, got {t.dtype}.")
        if t.ndim == 0:
            raise ValueError(f"`{label}` must have a batch dimension (N, *), got a scalar.")
        if t.shape[0] == 0:
            raise ValueError(f"`{label}` must hold at least one sample, got an empty batch {tuple(t.shape)}.")
    n = xs[0].shape[0]
    for i, t in enumerate(xs[1:], start=1):
        if t.shape[0] != n:
            raise ValueError(
                f"All tensors in `{name}` must share the batch size N; "
                f"`{name}[0]` has N={n} but `{name}[{i}]` has N={t.shape[0]}."
            )
    return xs


def as_pair(real: Any, fake: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """:func:`as_inputs` of ``real`` and ``fake``, and :func:`check_pair`; two tensors that pass every
    check of both take one test."""
    if (
        isinstance(real, Tensor)
        and isinstance(fake, Tensor)
        and real.ndim > 0
        and real.shape[0] > 0
        and real.is_floating_point()
        and real.shape == fake.shape
        and real.dtype == fake.dtype
        and real.device == fake.device
    ):
        return (real,), (fake,)
    reals, fakes = as_inputs(real, "real"), as_inputs(fake, "fake")
    check_pair(reals, fakes)
    return reals, fakes


def check_pair(real: tuple[Tensor, ...], fake: tuple[Tensor, ...]) -> None:
    """``real`` and ``fake`` must hold the same number of tensors of the same shapes and dtypes."""
    if len(real) != len(fake):
        raise ValueError(f"`real` and `fake` must hold the same number of tensors, got {len(real)} and {len(fake)}.")
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        where = "" if len(real) == 1 else f" (input {i})"
        if r.shape != f.shape:
            raise ValueError(
                f"`real` and `fake` must have the same shape{where}, got {tuple(r.shape)} and {tuple(f.shape)}."
            )
        if r.dtype != f.dtype:
            raise TypeError(f"`real` and `fake` must have the same dtype{where}, got {r.dtype} and {f.dtype}.")
        if r.device != f.device:
            raise ValueError(f"`real` and `fake` must be on the same device{where}, got {r.device} and {f.device}.")


def check_choice(value: Any, name: str, options: Iterable[str]) -> None:
    """``value`` must be one of ``options`` (the registry the message is built from)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"Unknown {name} {value!r}. Expected one of {sorted(options)}.")


def check_number(
    value: Any, name: str, *, low: float | None = None, strict: bool = False, finite: bool = True
) -> float:
    """``value`` must be a real number (not a bool), finite unless ``finite=False``, optionally ``>= low``
    (``> low`` if strict)."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"`{name}` must be a real number, got {_type_name(value)}.")
    value = float(value)
    if value != value:  # NaN
        raise ValueError(f"`{name}` must not be NaN.")
    if finite and value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if low is not None and (value <= low if strict else value < low):
        relation = ">" if strict else ">="
        raise ValueError(f"`{name}` must be {relation} {low:g}, got {value:g}.")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be a bool; NumPy's ``np.bool_`` (what comparisons of arrays give) counts as one."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"`{name}` must be a bool, got {_type_name(value)}.")


def check_int(value: Any, name: str, *, low: int) -> int:
    """``value`` must be an int ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {_type_name(value)}.")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}.")
    return int(value)


def check_critic(critic: Any) -> None:
    if not callable(critic):
        raise TypeError(f"`critic` must be callable (an nn.Module or a function), got {_type_name(critic)}.")


def check_alpha(alpha: Any, like: Tensor) -> Tensor:
    """A user-given ``alpha``: shape ``(N,)``, values in [0, 1]. Returns it on ``like``'s device and dtype."""
    n = like.shape[0]
    if not isinstance(alpha, Tensor):
        raise TypeError(f"`alpha` must be a Tensor of shape ({n},), got {_type_name(alpha)}.")
    if alpha.shape != (n,):
        raise ValueError(f"`alpha` must have shape ({n},) (one value per sample), got {tuple(alpha.shape)}.")
    if not alpha.is_floating_point():
        raise TypeError(f"`alpha` must have a floating-point dtype, got {alpha.dtype}.")
    alpha = alpha.detach()  # a weight, never a path for gradients
    # Reading values costs one host sync (and a graph break under torch.compile, where it is skipped);
    # it only runs when the caller passes alpha explicitly.
    if not torch.compiler.is_compiling() and bool(((alpha < 0) | (alpha > 1) | alpha.isnan()).any()):
        lo, hi = alpha.min().item(), alpha.max().item()
        raise ValueError(f"`alpha` must lie in [0, 1], got values in [{lo!r}, {hi!r}].")
    return alpha.to(device=like.device)


def check_generator(generator: Any, like: Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {_type_name(generator)}.")
    if generator.device.type != like.device.type:
        raise ValueError(
            f"`generator` must be on the inputs' device ({like.device.type}), got a generator on "
            f"{generator.device.type}. Create it with torch.Generator(device=real.device)."
        )


def check_critic_output(out: Any, n: int, name: str = "critic") -> Tensor:
    """The critic's output (``name="critic"``) or given ``outputs`` must be a floating tensor whose
    leading dimension is the batch size."""
    what = "`critic` must return" if name == "critic" else f"`{name}` must be"
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} a Tensor, got {_type_name(out)}.")
    if out.ndim == 0 or out.shape[0] != n:
        got = (
            "a scalar (did it reduce over the batch, e.g. with .mean()?)"
            if out.ndim == 0
            else (f"shape {tuple(out.shape)}")
        )
        raise ValueError(
            f"{what} one score per sample, a tensor with leading dimension N={n} ((N,), (N, 1) or (N, ...)); got {got}."
        )
    if not out.is_floating_point():
        raise TypeError(f"{what} a floating-point tensor, got {out.dtype}.")
    return out


def check_call_args(critic_args: Any, critic_kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not isinstance(critic_args, (tuple, list)):
        raise TypeError(f"`critic_args` must be a tuple, got {_type_name(critic_args)}.")
    if critic_kwargs is None:
        critic_kwargs = {}
    elif not isinstance(critic_kwargs, dict):
        raise TypeError(f"`critic_kwargs` must be a dict or None, got {_type_name(critic_kwargs)}.")
    return tuple(critic_args), critic_kwargs


def check_scaler(scaler: Any) -> None:
    if scaler is not None and not (hasattr(scaler, "scale") and hasattr(scaler, "is_enabled")):
        raise TypeError(f"`scaler` must be a torch.amp.GradScaler or None, got {_type_name(scaler)}.")
