"""What exact penalties cannot do, found before any work is done.

An exact penalty differentiates the critic twice. Some critics make that wrong or impossible;
this module finds them and says what to do instead. The exact paths (both backends) call
:func:`check_exact_critic` before any work, run the critic under :func:`math_attention`, and check
the graph once per critic with :func:`check_graph` (autograd) or :func:`probe_graph` (func). The
double-backward-free estimators need none of this and call none of it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from gradpen._args import CriticCall

INSTEAD = (
    "Instead: the double-backward-free estimators gradpen.approx_r1_penalty, gradpen.approx_r2_penalty "
    "and gradpen.approx_gradient_penalty; or an exact penalty on a part of the critic that can be "
    "differentiated twice (its head, on the features of the rest)"
)


class UnsupportedCriticError(RuntimeError):
    """An exact gradient penalty cannot be computed for this critic: it cannot be differentiated twice,
    or not correctly (an op without a double backward, FSDP, ``DistributedDataParallel(static_graph=True)``,
    an op that ``torch.func.vmap`` cannot run). The message names the cause and what to use instead."""


def critic_modules(critic: Any) -> list[nn.Module]:
    """The modules behind ``critic``: the critic itself, or what a ``functools.partial``, a bound
    method (``D.forward``), a ``torch.compile``\\ d module or a function's closure
    (``lambda x: D(x, y)`` inside a training step) holds. A module that a function reads as a global
    variable is not seen."""
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
        elif isinstance(obj, types.FunctionType) and obj.__closure__:
            todo.extend(v for v in _cell_contents(obj.__closure__) if isinstance(v, (nn.Module, functools.partial)))
    return seen


def _cell_contents(cells: tuple[Any, ...]) -> Iterator[Any]:
    for cell in cells:
        try:
            yield cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue


def batch_coupled_modules(critic: Any) -> list[str]:
    """Names of the BatchNorm layers behind ``critic`` that normalise with batch statistics."""
    return [
        name or type(m).__name__
        for module in critic_modules(critic)
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]


# --- FSDP and static-graph DDP ---------------------------------------------------------------


def _wrapper_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(the FSDP2 and FSDP1 classes, the DDP class), from modules already imported: a critic cannot be
    wrapped by a module nobody imported, and gradpen does not pay FSDP's import time. Plain look-ups,
    which torch.compile traces without a graph break."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    return (
        (fsdp.FSDPModule, fsdp.FullyShardedDataParallel) if fsdp is not None else (),
        (ddp.DistributedDataParallel,) if ddp is not None else (),
    )


def check_exact_critic(critic: Any) -> None:
    """Refuse, before any work, a critic that is or contains an FSDP module (FSDP2 ``fully_shard`` or
    FSDP1 ``FullyShardedDataParallel``) or a ``DistributedDataParallel`` with a static graph.

    Raises:
        UnsupportedCriticError: naming the module, why, and what to do instead.
    """
    fsdp, ddp = _wrapper_classes()
    for module in critic_modules(critic):
        for m in module.modules():
            if isinstance(m, fsdp):
                raise UnsupportedCriticError(
                    f"An exact gradient penalty cannot run through FSDP: the critic contains the FSDP module "
                    f"{_where(module, m)}. The penalty differentiates the critic twice, and the second backward "
                    "through FSDP's parameter hooks crashes (FSDP2: 'setStorage ... storage of size 0', pytorch "
                    "issue 172543) or, with reshard_after_backward=False, gives wrong or missing gradients "
                    f"without an error. {INSTEAD}, computed in FSDP's ordinary forward and backward; or "
                    "DistributedDataParallel, which the exact penalties support."
                )
            if isinstance(m, ddp) and m.static_graph:
                raise UnsupportedCriticError(
                    f"An exact gradient penalty cannot run through DistributedDataParallel with "
                    f"static_graph=True ({_where(module, m)}): DDP's static-graph mode never all-reduces the "
                    "gradients of the penalty's double backward, so each rank keeps its own gradients, without "
                    "an error. Build DDP without static_graph (the default, or find_unused_parameters=True; "
                    f"both supported), and do not call _set_static_graph(). {INSTEAD}."
                )


def _where(root: nn.Module, m: nn.Module) -> str:
    """``m`` named by its path in ``root``, for an error message."""
    name = next(n for n, x in root.named_modules() if x is m)
    return f"`{name}` ({type(m).__name__})" if name else type(m).__name__


# --- attention: the SDPA MATH kernel ---------------------------------------------------------


# (getter, setter, on under MATH) of each SDPA kernel flag, as sdpa_kernel sets them.
_SDP_FLAGS = tuple(
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"), name == "math")
    for name in ("flash", "mem_efficient", "math", "cudnn", "overrideable")
    if hasattr(torch._C, f"_get_{name}_sdp_enabled") and hasattr(torch._C, f"_set_sdp_use_{name}")
)


class _MathOnly:
    """``sdpa_kernel(SDPBackend.MATH)`` for eager mode, the flags saved, set and restored directly:
    5-10 µs per enter and exit against 54-61 µs for ``sdpa_kernel`` (2-core CPU under load)."""

    __slots__ = ("saved",)

    def __enter__(self) -> None:
        self.saved = [get() for get, _, _ in _SDP_FLAGS]
        for _, set_, on in _SDP_FLAGS:
            set_(on)

    def __exit__(self, *exc: object) -> None:
        for (_, set_, _), was in zip(_SDP_FLAGS, self.saved, strict=True):
            set_(was)


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """``scaled_dot_product_attention`` on its MATH kernel, the only one with a double backward.

    The fused kernels (flash, memory-efficient, cuDNN, CPU flash) have none, and the kernel is
    chosen at forward time, so every forward that is differentiated twice runs under this. Under
    torch.compile it is ``sdpa_kernel(SDPBackend.MATH)`` itself, which dynamo traces.
    """
    if torch.compiler.is_compiling() or len(_SDP_FLAGS) < 5:
        return sdpa_kernel(SDPBackend.MATH)
    return _MathOnly()


# --- ops without a double backward ----------------------------------------------------------

# The code of the wrapper that ``@once_differentiable`` puts around a backward (one code object for all).
_ONCE_CODE = once_differentiable(lambda ctx: None).__code__
# Nodes that raise when run: ops with no derivative formula, and @once_differentiable's DelayedError.
_ERROR_NODES = frozenset({"torch::autograd::NotImplemented", "torch::autograd::Error"})
# Critics whose graph has been checked: the first module behind the critic (and its mode), or the callable.
_checked: weakref.WeakKeyDictionary[Any, set[bool]] = weakref.WeakKeyDictionary()


def _key(critic: Any) -> tuple[Any, bool] | None:
    mods = critic_modules(critic)
    # A function made anew on every call (a lambda in the training step) is known by its code.
    obj, training = (mods[0], mods[0].training) if mods else (getattr(critic, "__code__", critic), False)
    try:
        weakref.ref(obj)
    except TypeError:
        return None
    return obj, training


def _is_checked(critic: Any) -> bool:
    key = _key(critic)
    return key is not None and key[1] in _checked.get(key[0], ())


def _mark_checked(critic: Any) -> None:
    key = _key(critic)
    if key is not None:
        _checked.setdefault(key[0], set()).add(key[1])


def _node_error(node: Any) -> str:
    """The message an error node raises when run (it names the op)."""
    try:
        node(*[None] * len(node._input_metadata))
    except RuntimeError as e:
        return str(e).split("\n")[0]
    return node.name()


def _graph_problem(out: Tensor, grads: Iterable[Tensor | None]) -> str | None:
    """What, in the graph of the critic's output ``out`` or of its input gradients ``grads``, has no
    double backward; ``None`` if nothing. The forward graph goes first: it names a Function."""
    seen: set[Any] = set()
    for roots in ([out.grad_fn], [g.grad_fn for g in grads if g is not None]):
        todo = [r for r in roots if r is not None]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            cls = getattr(node, "_forward_cls", None)
            if cls is not None and getattr(cls.backward, "__code__", None) is _ONCE_CODE:
                return (
                    f"the torch.autograd.Function `{cls.__qualname__}`, whose backward is marked "
                    "@once_differentiable (its backward is not itself differentiated)"
                )
            if node.name() in _ERROR_NODES:
                return f"an op without a double backward (PyTorch: '{_node_error(node)}')"
            todo.extend(n for n, _ in node.next_functions if n is not None)
    return None


def _refuse(problem: str) -> UnsupportedCriticError:
    return UnsupportedCriticError(
        f"The critic cannot be differentiated twice, which an exact gradient penalty needs: it uses {problem}. "
        "The penalty's backward would fail, or silently drop that op's second-order terms. "
        f"{INSTEAD}. For a cuDNN RNN (LSTM/GRU on CUDA), run the critic under "
        "torch.backends.cudnn.flags(enabled=False), whose RNN kernels have a double backward."
    )


def check_graph(critic: Any, out: Tensor, grads: Iterable[Tensor]) -> None:
    """After the first backward (``create_graph=True``): refuse the critic if the graph of its output
    ``out`` or of its input gradients ``grads`` holds an op without a double backward. Walked once per
    critic (and training mode); later calls cost a dictionary look-up.

    Raises:
        UnsupportedCriticError: naming the op and the alternatives.
    """
    if _is_checked(critic):
        return
    problem = _graph_problem(out, grads)
    if problem is not None:
        raise _refuse(problem)
    _mark_checked(critic)


def probe_graph(critic: Any, inputs: tuple[Tensor, ...], call: CriticCall) -> None:
    """:func:`check_graph` for the func backend, whose transforms hide the ops: once per critic, one
    sample goes through a plain autograd double-backward graph. The critic's buffers and the RNG
    are restored afterwards, so the probe leaves no trace (BatchNorm statistics, dropout draws).

    Raises:
        UnsupportedCriticError: naming the op and the alternatives.
    """
    if _is_checked(critic):
        return
    buffers = [(b, b.detach().clone()) for m in critic_modules(critic) for b in m.buffers()]
    device = inputs[0].device
    forked = [device] if device.type != "cpu" else []
    try:
        with torch.random.fork_rng(forked, device_type=device.type if forked else "cuda"), torch.enable_grad():
            xs = tuple(x[:1].detach().requires_grad_(True) for x in inputs)
            with math_attention():
                out = call.with_rows(tuple(r[:1] for r in call.rows()))(critic, *xs)
            if not (isinstance(out, Tensor) and out.requires_grad):
                return  # a bad output is reported by the backend; a constant one has nothing to differentiate
            grads = torch.autograd.grad(out.sum(), xs, create_graph=True, allow_unused=True)
            problem = _graph_problem(out, grads)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if problem is not None:
        raise _refuse(problem)
    _mark_checked(critic)


# Messages of torch.func when vmap/grad cannot run an op of the critic.
_FUNC_LIMITS = ("vmap", "functorch transforms", "Batching rule", "torch.func")


@contextlib.contextmanager
def func_limits() -> Iterator[None]:
    """Turn torch.func's failures to run an op of the critic into an :class:`UnsupportedCriticError`."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, UnsupportedCriticError) or not any(s in str(e) for s in _FUNC_LIMITS):
            raise
        raise UnsupportedCriticError(
            f"backend='func' cannot run this critic: torch.func.vmap/grad failed with '{str(e).splitlines()[0]}'. "
            "Use backend='autograd' (exact as long as the samples of a batch do not interact); or, if the op "
            f"also has no double backward, {INSTEAD[len('Instead: ') :]}."
        ) from e
