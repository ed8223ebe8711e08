"""The torch releases gradpen runs on, and what needs a newer one than the floor.

Checked on the CPU, with the library test suite, on torch 2.3.1, 2.4.1, 2.5.1, 2.6.0, 2.8.0 (PyPI), 2.13.0
(the CPU wheel), 2.14.1 and 2.15.0. Without the fall-backs of this patch, on an older torch:

- torch<2.3: ``import gradpen`` fails (``No module named 'torch.nn.attention'``; 2.2 also lacks
  ``torch.compiler.is_compiling``, ``torch.get_device_module``, ``tree_flatten_with_path`` and NumPy 2
  support); :func:`check_floor` says which torch gradpen needs instead.
- torch<2.6: every exact penalty raises ``AttributeError: module 'torch.distributed.fsdp' has no
  attribute 'FSDPModule'`` once anything imported ``torch.distributed.fsdp`` (FSDP1 code, and the test
  suite's 2-process DDP workers on 2.4/2.5, whose own code does not import it). FSDP2 is found in
  ``torch.distributed._composable.fsdp`` instead (its class was ``FSDP`` before 2.4).
- torch<2.5: refusing an op without a double backward raises ``AttributeError: 'NotImplemented'
  object has no attribute '_input_metadata'`` instead of :class:`gradpen.UnsupportedCriticError`.
- torch<COMPILE_REGION: a penalty called inside a compiled function fails in dynamo (2.3/2.4:
  ``InternalTorchDynamoError`` and ``call_enumerate() got an unexpected keyword argument 'start'``;
  2.6: ``Unsupported: 'skip function _grad_mode'``; 2.8: ``Graph break under
  GenericContextWrappingVariable`` from ``tree_flatten_with_path``, and ``InternalTorchDynamoError:
  'CriticCall' object has no attribute 'leaves'``). :func:`eager_below_compile_region` runs it eagerly
  there instead. A compiled critic (``gradpen.gradient_penalty(torch.compile(critic), ...)``) works on
  every supported torch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string (``"2.6.0+cu124"`` -> ``(2, 6)``)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def _name(release: tuple[int, int]) -> str:
    return f"{release[0]}.{release[1]}"


TORCH = _release(torch.__version__)
# The oldest release whose library test suite passes (less the compile-region tests below).
FLOOR = (2, 3)
# The oldest release checked to trace a gradpen penalty inside a torch.compile region
# (2.3-2.8 fail; 2.9-2.12 were not checked).
COMPILE_REGION = (2, 13)


class TorchTooOldError(RuntimeError):
    """A gradpen feature needs a newer torch than the one installed. The message names the feature,
    the torch release it needs and the one found."""


def too_old(feature: str, needed: tuple[int, int]) -> str:
    return (
        f"{feature} needs torch>={_name(needed)}, but this is torch {torch.__version__}. "
        f"Upgrade torch (pip install 'torch>={_name(needed)}')."
    )


def require(feature: str, needed: tuple[int, int]) -> None:
    """Raise :class:`TorchTooOldError` at the call if the installed torch is older than ``needed``."""
    if needed > TORCH:
        raise TorchTooOldError(too_old(feature, needed))


def check_floor() -> None:
    """At ``import gradpen``: one clear error below the floor, instead of an ImportError deep inside
    (torch<2.3: ``No module named 'torch.nn.attention'``)."""
    if TORCH < FLOOR:
        raise ImportError(too_old("gradpen", FLOOR))


def eager_below_compile_region(fn: F) -> F:
    """``fn`` itself on torch>=COMPILE_REGION. On older torch, ``fn`` under ``torch.compiler.disable``:
    a compiled function that calls it graph-breaks there and runs the penalty eagerly (which is
    correct), and ``torch.compile(..., fullgraph=True)`` fails with dynamo's "Skip calling
    torch.compiler.disable()d function" error, which carries the reason below from torch 2.8 on
    (instead of an internal dynamo error deep inside gradpen)."""
    if TORCH >= COMPILE_REGION:
        return fn
    reason = (
        f"gradpen.{fn.__name__} inside a torch.compile region "
        + too_old("", COMPILE_REGION).lstrip()
        + " Until then it runs eagerly (a graph break). A compiled critic works on this torch: "
        "gradpen.gradient_penalty(torch.compile(critic), ...)."
    )
    try:
        disabled = torch.compiler.disable(fn, reason=reason)
    except TypeError:  # torch<2.8: no reason=
        disabled = torch.compiler.disable(fn)
    return functools.wraps(fn)(disabled)  # type: ignore[return-value]


check_floor()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on ``device_type`` when autocast is on there, else ``None``. torch<2.4 has no
    ``torch.is_autocast_enabled(device_type)``: its per-device functions are used there."""
    if TORCH >= (2, 4):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None
