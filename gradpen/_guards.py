"""What exact penalties cannot do, found before any work is done.

An exact penalty differentiates the critic twice. Some critics make that wrong or impossible;
this module finds them from the critic object and says what to do instead. Every exact path
calls it; the double-backward-free estimators do not need it.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


def critic_modules(critic: Any) -> list[nn.Module]:
    """The modules behind ``critic``: the critic itself, or what a ``functools.partial``, a bound
    method (``D.forward``) or a ``torch.compile``\\ d module wraps. A plain function or a lambda hides
    its modules; then nothing is found."""
    seen: list[nn.Module] = []
    todo = [critic]
    while todo:
        obj = todo.pop()
        if isinstance(obj, nn.Module):
            seen.append(getattr(obj, "_orig_mod", obj))
        elif isinstance(obj, functools.partial):
            todo.append(obj.func)
            todo.extend(v for v in (*obj.args, *obj.keywords.values()) if isinstance(v, nn.Module))
        elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # a bound method
            todo.append(obj.__self__)
    return seen


def batch_coupled_modules(critic: Any) -> list[str]:
    """Names of the BatchNorm layers behind ``critic`` that normalise with batch statistics."""
    return [
        name or type(m).__name__
        for module in critic_modules(critic)
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]
