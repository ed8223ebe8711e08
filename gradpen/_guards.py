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
    "Instead: backend='fd', which gives the same penalty with first-order passes only (exact value; the "
    "parameter gradient by a finite difference along the input gradient) for a smooth critic (no ReLU, "
    "LeakyReLU or max-pooling); for a piecewise-linear critic the double-backward-free estimators "
    "gradpen.approx_r1_penalty, approx_r2_penalty and approx_gradient_penalty; or an exact penalty on a part "
    "of the critic that can be differentiated twice (its head, on the features of the rest)"
)


class UnsupportedCriticError(RuntimeError):
    """An exact gradient penalty cannot be computed for this critic: it cannot be differentiated twice,
    or not correctly (an op without a double backward, FSDP, ``DistributedDataParallel(static_graph=True)``,
    .. versionadded:: 0.2
    an op that ``torch.func.vmap`` cannot run). The message names the cause and what to use instead."""


# How far the module search looks: into containers (a closure over a dataset list is not walked whole),
# and in all (a function that calls many helpers).
_CONTAINER_ITEMS = 64
_PARTS = 256


def _parts(critic: Any) -> Iterator[Any]:
    """Every module, function and callable object behind ``critic``, depth first, each once.

    Looked into: a module (itself; its children are its own), a ``functools.partial`` (the function
    and its arguments), a bound method (the object and the function), a function (the contents of its
    closure cells, its default arguments and the global variables its code names; a
    ``torch.compile``\\ d function's original), a callable object (its attributes), and lists, tuples,
    sets and dict values among these (up to 64 items each, 256 parts in all). Not looked into:
    attributes of non-callable objects (``self.holder.net``), and what a function reaches through
    attribute access on a global (``config.critic``).
    """
    seen: set[int] = set()
    todo = [critic]
    while todo and len(seen) < _PARTS:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (Tensor, str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            yield uncompiled(obj)
            continue
        if isinstance(obj, (list, tuple, set, frozenset, dict)):
            items = list(obj.values() if isinstance(obj, dict) else obj)[:_CONTAINER_ITEMS]
            todo.extend(reversed(items))
            continue
        if not callable(obj):
            continue
        yield obj
        if isinstance(obj, functools.partial):
            todo.extend(reversed([obj.func, *obj.args, *obj.keywords.values()]))
        elif isinstance(obj, types.MethodType):
            todo.extend([obj.__func__, obj.__self__])
        elif isinstance(obj, types.FunctionType):
            orig = getattr(obj, "_torchdynamo_orig_callable", None)
            names = obj.__globals__
            inner = [
                *_cell_contents(obj.__closure__ or ()),
                *(obj.__defaults__ or ()),
                *(obj.__kwdefaults__ or {}).values(),
                *(names[name] for name in obj.__code__.co_names if name in names),
            ]
            todo.extend(reversed([orig, *inner] if orig is not None else inner))
        elif not isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, type)):
            todo.extend(reversed(list(getattr(obj, "__dict__", {}).values())[:_CONTAINER_ITEMS]))


def _cell_contents(cells: tuple[Any, ...]) -> Iterator[Any]:
    for cell in cells:
        try:
            yield cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue


def uncompiled(m: nn.Module) -> nn.Module:
    """The module that ``torch.compile(m)`` wraps (its ``_orig_mod`` submodule), else ``m``: a dictionary
    look-up, where ``getattr(m, "_orig_mod", m)`` raises and catches an AttributeError (3 µs)."""
    modules = m.__dict__.get("_modules")  # absent in a module whose __init__ did not run nn.Module's
    # A dict, except in a torch.jit.script module (an OrderedModuleDict, which has no .get).
    inner = modules.get("_orig_mod") if isinstance(modules, dict) and modules else None
    return m if inner is None else inner


def critic_modules(critic: Any) -> list[nn.Module]:
    """The modules behind ``critic`` (see :func:`_parts` for where they are looked for): the critic
    itself, or what a ``functools.partial``, a bound method (``D.forward``), a ``torch.compile``\\ d
    module, a callable object or a function's closure (``lambda x: D(x, y)`` inside a training step)
    holds. A module that a function reads as a global variable is not seen."""
    if isinstance(critic, nn.Module):  # the common case, without the search
        return [uncompiled(critic)]
    return [p for p in _parts(critic) if isinstance(p, nn.Module)]


def _module_key(m: nn.Module) -> tuple[Any, ...]:
    """A module's part of a critic key: its identity, class and training mode."""
    return (id(m), type(m), m.training)


def critic_key(critic: Any) -> tuple[tuple[Any, ...], list[Any]]:
    """What a once-per-critic check depends on: the code that runs and the modules it runs with.

    The key holds, for every part behind the critic (:func:`_parts`), a module's identity, class and
    training mode, or a function's code object (a lambda made anew on every call keeps its code), or a
    callable object's class; data in closures (the labels of this step) does not enter it. Returns
    the key and the objects whose death must end its validity.
    """
    if isinstance(critic, nn.Module):  # the common case, without the search
        m = uncompiled(critic)
        return (_module_key(m),), [m]
    key: list[Any] = []
    anchors: list[Any] = []
    for part in _parts(critic):
        if isinstance(part, nn.Module):
            part = uncompiled(part)
            key.append(_module_key(part))
            anchors.append(part)
        elif isinstance(part, types.FunctionType):
            key.append(id(part.__code__))
            anchors.append(part.__code__)
        elif isinstance(part, type):  # a class (an autograd.Function) lives as long as its module
            key.append(id(part))
            anchors.append(part)
        elif isinstance(part, (functools.partial, types.MethodType)):
            continue  # their function and objects are parts of their own
        else:
            key.append(type(part))
    return tuple(key), anchors


_MISSING = object()


class CriticCache:
    """Results of a once-per-critic check, by :func:`critic_key`. An entry is dropped when one of the
    objects of its key is garbage-collected, so a reused id never inherits another critic's result."""

    def __init__(self) -> None:
        self._values: dict[tuple[Any, ...], Any] = {}

    # Each method takes the critic's ``key`` where the caller has it already (one computation for the
    # several cached checks of a call), else computes ``critic_key(critic)[0]``.

    def get(self, critic: Any, default: Any = None, key: tuple[Any, ...] | None = None) -> Any:
        return self._values.get(critic_key(critic)[0] if key is None else key, default)

    def lookup(self, critic: Any, key: tuple[Any, ...] | None = None) -> tuple[bool, Any]:
        """(whether the critic has an entry, its value), with one key computation."""
        value = self._values.get(critic_key(critic)[0] if key is None else key, _MISSING)
        return (False, None) if value is _MISSING else (True, value)

    def has(self, critic: Any, key: tuple[Any, ...] | None = None) -> bool:
        return (critic_key(critic)[0] if key is None else key) in self._values

    def __contains__(self, critic: Any) -> bool:
        return self.has(critic)

    def set(self, critic: Any, value: Any = True) -> None:
        key, anchors = critic_key(critic)
        if key not in self._values:
            for obj in anchors:
                with contextlib.suppress(TypeError):  # an object that takes no weak reference stays
                    weakref.finalize(obj, self._values.pop, key, None)
        self._values[key] = value


# Layers whose output, and so the critic's input gradient, has kinks: the fd backend's finite difference
# across them gives a wrong parameter gradient. ELU is smooth enough (a continuous derivative) only with
# alpha = 1 (CELU with any alpha); SELU's derivative jumps at 0.
_KINKED = (
    nn.ReLU,
    nn.Hardtanh,  # and ReLU6
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.SELU,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)


def _wrapper_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(the FSDP2 and FSDP1 classes, the DDP class), from modules already imported: a critic cannot be
    wrapped by a module nobody imported, and gradpen does not pay FSDP's import time. Plain look-ups,
    which torch.compile traces without a graph break."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    # FSDP2 before torch 2.6 lives in torch.distributed._composable.fsdp (torch.distributed.fsdp has no
    # FSDPModule), and its class was named FSDP before 2.4.
    composable = sys.modules.get("torch.distributed._composable.fsdp")
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    found = []
    wrappers = (
        (fsdp, "FSDPModule"),
        (composable, "FSDPModule"),
        (composable, "FSDP"),
        (fsdp, "FullyShardedDataParallel"),
    )
    for mod, name in wrappers:
        cls = getattr(mod, name, None) if mod is not None else None
        if cls is not None and cls not in found:
            found.append(cls)
    return tuple(found), ((ddp.DistributedDataParallel,) if ddp is not None else ())


class Scan:
    """What the module guards look for behind a critic, found in one walk over its modules: FSDP and
    static-graph DDP wrappers, BatchNorm layers with batch statistics, and kinked layers, each as
    ``(root, module)``; :meth:`name` names one for a message. :attr:`key` is the critic's
    :func:`critic_key`, for the cached checks of the same call."""

    __slots__ = ("_critic", "_key", "batchnorm", "compiled", "fsdp", "kinked", "static_ddp")

    def __init__(self, critic: Any) -> None:
        self.fsdp: list[tuple[nn.Module, nn.Module]] = []
        self.static_ddp: list[tuple[nn.Module, nn.Module]] = []
        self.batchnorm: list[tuple[nn.Module, nn.Module]] = []
        self.kinked: list[tuple[nn.Module, nn.Module]] = []
        self._critic = critic
        if isinstance(critic, nn.Module):  # the common case: the module and its key in one look-up
            m = uncompiled(critic)
            roots = [m]
            self.compiled = m is not critic  # made by torch.compile(module)
            self._key: tuple[Any, ...] | None = (_module_key(m),)  # critic_key(critic)[0], without its search
        else:
            roots = critic_modules(critic)
            self.compiled = False
            self._key = None
        for root in roots:
            for kind, m in _found(root):
                self._add(kind, root, m)

    def _add(self, kind: str, root: nn.Module, m: nn.Module) -> None:
        if kind == "batchnorm":
            if m.training or not m.track_running_stats:
                self.batchnorm.append((root, m))
        elif kind == "elu":
            if m.alpha != 1.0:
                self.kinked.append((root, m))
        elif kind == "kinked":
            self.kinked.append((root, m))
        elif kind == "fsdp":
            self.fsdp.append((root, m))
        elif kind == "ddp" and m.static_graph:
            self.static_ddp.append((root, m))

    @property
    def key(self) -> tuple[Any, ...]:
        """``critic_key(critic)[0]``, as it was when the modules were walked (training modes included)."""
        if self._key is None:
            self._key = critic_key(self._critic)[0]
        return self._key

    @staticmethod
    def name(root: nn.Module, m: nn.Module) -> str:
        """``m``'s path in ``root`` (``""`` for the root itself)."""
        return next((n for n, x in root.named_modules() if x is m), "")


def _walk(root: nn.Module, record: bool) -> tuple[list[tuple[str, nn.Module]], list[Any]]:
    """The modules under ``root`` that a guard looks at, as ``(kind, module)``, in the order of
    ``Module.modules()``, without its names and generators: each module once, each class classified once
    (:func:`_kinds`). With ``record``, also the tree as walked: for every module a weak reference, its
    class and the ids of its children."""
    found: list[tuple[str, nn.Module]] = []
    tree: list[Any] = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        kinds = _KINDS.get(type(m))
        if kinds is None:
            kinds = _kinds(type(m))
        for kind in kinds:
            found.append((kind, m))
        children = m._modules.values()
        if record:
            tree.append((weakref.ref(m), type(m), tuple(map(id, children))))
        if children:
            todo.extend(c for c in reversed(children) if c is not None)
    return found, tree


# The last walk under each root module (by id; dropped when the root is collected): its tree (see _walk)
# and what it found, by weak reference. Nothing here keeps a module alive.
_TREES: dict[int, tuple[list[Any], list[tuple[str, Any]]]] = {}


def _found(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """:func:`_walk`'s findings under ``root``, walked again only when the tree changed.

    The last walk is reused while every module it met is alive, of the same class, with the same
    children in the same order: the walk would then meet the same modules, so it finds the same ones
    (what a guard reads off a found module, such as its training mode, is read at each call). A
    child that was replaced is either alive (so its id is not reused) or dead (so its reference is).
    Under torch.compile the walk runs every time (dynamo would trace the weak references).
    """
    if torch.compiler.is_compiling():
        return _walk(root, False)[0]
    last = _TREES.get(id(root))
    same_root = last is not None and last[0][0][0]() is root
    if same_root:
        for ref, cls, children in last[0]:
            m = ref()
            if m is None or type(m) is not cls:
                break
            now = m._modules
            if (now or children) and tuple(map(id, now.values())) != children:  # a leaf then and now: no tuple
                break
        else:
            return [(kind, ref()) for kind, ref in last[1]]
    found, tree = _walk(root, True)
    if not same_root:
        weakref.finalize(root, _TREES.pop, id(root), None)
    _TREES[id(root)] = (tree, [(kind, weakref.ref(m)) for kind, m in found])
    return found


# What Scan looks for, by class (a module wrapped by fully_shard can be a BatchNorm and FSDP at once).
# A class is classified when first met; the FSDP and DDP classes it is compared with come from modules
# already imported, and a subclass of one cannot exist before its module is imported, so an earlier
# classification stays right.
_KINDS: dict[type, tuple[str, ...]] = {}


def _kinds(cls: type) -> tuple[str, ...]:
    fsdp, ddp = _wrapper_classes()
    kinds = []
    if issubclass(cls, nn.modules.batchnorm._BatchNorm):
        kinds.append("batchnorm")
    elif issubclass(cls, nn.ELU):
        kinds.append("elu")
    elif issubclass(cls, _KINKED):
        kinds.append("kinked")
    if fsdp and issubclass(cls, fsdp):
        kinds.append("fsdp")
    if ddp and issubclass(cls, ddp):
        kinds.append("ddp")
    _KINDS[cls] = found = tuple(kinds)
    return found


def batch_coupled_modules(critic: Any, scan: Scan | None = None) -> list[str]:
    """Names of the BatchNorm layers behind ``critic`` that normalise with batch statistics."""
    return [Scan.name(root, m) or type(m).__name__ for root, m in (scan or Scan(critic)).batchnorm]


def kinked_modules(critic: Any, scan: Scan | None = None) -> list[str]:
    """Names of the piecewise-linear (kinked) layers behind ``critic``: ReLU and its relatives,
    max-pooling, and ELU with alpha != 1."""
    named = [(Scan.name(root, m), m) for root, m in (scan or Scan(critic)).kinked]
    return [f"{name} ({type(m).__name__})" if name else type(m).__name__ for name, m in named]


# --- FSDP and static-graph DDP ---------------------------------------------------------------


def check_exact_critic(critic: Any, scan: Scan | None = None) -> None:
    """Refuse, before any work, a critic that is or contains an FSDP module (FSDP2 ``fully_shard`` or
    FSDP1 ``FullyShardedDataParallel``) or a ``DistributedDataParallel`` with a static graph.

    Raises:
        UnsupportedCriticError: naming the module, why, and what to do instead.
    """
    scan = scan or Scan(critic)
    for root, m in scan.fsdp:
        name = Scan.name(root, m)
        raise UnsupportedCriticError(
            f"An exact gradient penalty cannot run through FSDP: the critic contains the FSDP module "
            f"{_where(name, m)}. The penalty differentiates the critic twice, and the second backward "
            "through FSDP's parameter hooks crashes (FSDP2: 'setStorage ... storage of size 0', "
            "https://github.com/pytorch/pytorch/issues/172543); with set_reshard_after_backward(False) it "
            "raises nothing but leaves the parameters without gradients (with nested FSDP units, some "
            f"gradients are also wrong). {INSTEAD}; fd and the estimators run "
            "in FSDP's ordinary forward and backward. Or DistributedDataParallel, which the exact "
            "penalties support."
        )
    for root, m in scan.static_ddp:
        raise _static_ddp(
            Scan.name(root, m), m, "An exact gradient penalty", "the gradients of the penalty's double backward"
        )


def check_distributed_fd(critic: Any, scan: Scan | None = None) -> None:
    """backend='fd': refuse a ``DistributedDataParallel(static_graph=True)`` critic (FSDP is fine).

    Raises:
        UnsupportedCriticError: naming the module, why, and what to do instead.
    """
    for root, m in (scan or Scan(critic)).static_ddp:
        raise _static_ddp(Scan.name(root, m), m, "backend='fd'", "the gradients of the penalty's extra forwards")


def _static_ddp(name: str, m: nn.Module, who: str, what: str) -> UnsupportedCriticError:
    return UnsupportedCriticError(
        f"{who} cannot run through DistributedDataParallel with static_graph=True ({_where(name, m)}): "
        f"DDP's static-graph mode expects the graph of one forward per backward and never all-reduces {what}, "
        "so each rank keeps its own gradients, without an error. Build DDP without static_graph (the "
        "default, or find_unused_parameters=True; both supported), and do not call _set_static_graph()."
    )


def _where(name: str, m: nn.Module) -> str:
    """``m`` named by its path in its root, for an error message."""
    return f"`{name}` ({type(m).__name__})" if name else type(m).__name__


# A context that does nothing, made once (nullcontext is reusable and reentrant).
NO_CONTEXT = contextlib.nullcontext()


def grad_enabled() -> contextlib.AbstractContextManager[Any]:
    """``torch.enable_grad()``, or nothing where grad mode is on already (the common case)."""
    return NO_CONTEXT if torch.is_grad_enabled() else torch.enable_grad()


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
# Critics whose graph has passed the check (key: critic_key).
_graph_checked = CriticCache()
# Critics whose first checked graph had a softmax on the input path (key: critic_key) -> True / False. On the
# MATH kernel, attention is a softmax between two matmuls; a critic without one needs no MATH context.
_attention = CriticCache()


def _node_error(node: Any) -> str:
    """The message an error node raises when run (it names the op)."""
    metadata = getattr(node, "_input_metadata", None)
    # torch<2.5 nodes have no _input_metadata: try the argument counts (a wrong one is a TypeError).
    counts = [len(metadata)] if metadata is not None else range(16)
    for count in counts:
        try:
            node(*[None] * count)
        except TypeError:
            continue
        except RuntimeError as e:
            return str(e).split("\n")[0]
        break
    return node.name()


def _input_paths(out: Tensor, inputs: Iterable[Tensor]) -> list[Any]:
    """The nodes of ``out``'s graph that lie on a path to one of ``inputs`` (leaves): the ops whose
    backward the input gradient runs, and so the only ones a double backward differentiates twice.
    An op on the weights alone (a fake quantiser with a straight-through backward) is not among them."""
    targets = {id(x) for x in inputs}
    reaches: dict[Any, bool] = {}
    order: list[Any] = []
    todo: list[tuple[Any, bool]] = [(out.grad_fn, False)] if out.grad_fn is not None else []
    while todo:  # iterative post-order: a node reaches the inputs if one of its next functions does
        node, done = todo.pop()
        if done:
            nexts = [n for n, _ in node.next_functions if n is not None]
            variable = getattr(node, "variable", None)
            reaches[node] = (variable is not None and id(variable) in targets) or any(
                reaches.get(n, False) for n in nexts
            )
            if reaches[node]:
                order.append(node)
            continue
        if node in reaches:
            continue
        reaches[node] = False  # on the stack: a cycle cannot occur in autograd graphs
        todo.append((node, True))
        todo.extend((n, False) for n, _ in node.next_functions if n is not None and n not in reaches)
    return order


def _graph_problem(
    out: Tensor, inputs: Iterable[Tensor], grads: Iterable[Tensor | None], critic: Any = None
) -> str | None:
    """What, among the ops between ``out`` and ``inputs`` or in the graph of the input gradients
    ``grads``, has no double backward; ``None`` if nothing. The forward graph goes first: it names a
    Function. With ``critic``, also records whether the path holds a softmax (attention)."""
    path = _input_paths(out, inputs)
    if critic is not None:
        _attention.set(critic, _has_softmax(path))
    for node in path:
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and getattr(cls.backward, "__code__", None) is _ONCE_CODE:
            return (
                f"the torch.autograd.Function `{cls.__qualname__}`, whose backward is marked "
                "@once_differentiable (its backward is not itself differentiated)"
            )
    seen: set[Any] = set()
    todo = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name() in _ERROR_NODES:
            return f"an op without a double backward (PyTorch: '{_node_error(node)}')"
        todo.extend(n for n, _ in node.next_functions if n is not None)
    return None


def _node_of(t: Tensor) -> Any:
    """The graph node that stands for tensor ``t``: its grad_fn, or a leaf's gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    return t.view_as(t).grad_fn.next_functions[0][0]


def _reaches(t: Tensor, targets: set[Any], avoid: set[Any]) -> bool:
    """Whether the graph of ``t`` leads to one of the nodes ``targets`` other than through ``avoid``."""
    seen: set[Any] = set()
    todo = [t.grad_fn] if t.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if node in targets:
            return True
        if node in seen or node in avoid:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions if n is not None)
    return False


class FunctionWatch:
    """Hooks on the custom ``torch.autograd.Function``\\ s between ``out`` and ``inputs`` that find a
    backward which leaves autograd (NumPy, an extension kernel, ``.detach()``) without saying so with
    ``@once_differentiable``. During the ``create_graph=True`` backward, a Function that saved tensors
    requiring grad (its input or output, to compute its derivative) must return gradients whose graph
    leads back to them other than through the incoming gradients; one that does not has a derivative
    that autograd cannot differentiate, and its second-order terms would be lost without an error.

    A Function that saves nothing (a linear map with constant coefficients, exact without any
    second-order term) is not reported; :func:`gradpen.compare_backends` finds what this cannot.
    """

    def __init__(self, out: Tensor, inputs: Iterable[Tensor]) -> None:
        self.broken: list[str] = []
        self.handles = []
        for node in _input_paths(out, inputs):
            cls = getattr(node, "_forward_cls", None)
            if cls is not None and getattr(cls.backward, "__code__", None) is not _ONCE_CODE:
                self.handles.append(node.register_hook(self._hook(node, cls.__qualname__)))

    def _hook(self, node: Any, name: str) -> Any:
        def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
            try:
                saved = [t for t in node.saved_tensors if isinstance(t, Tensor) and t.requires_grad]
            except RuntimeError:  # saved tensors already freed: nothing to tell
                return
            if not saved:
                return
            targets = {_node_of(t) for t in saved}
            avoid = {g.grad_fn for g in grad_outputs if g is not None and g.grad_fn is not None}
            if any(g is not None and not _reaches(g, targets, avoid) for g in grad_inputs):
                self.broken.append(name)

        return hook

    def close(self) -> str | None:
        for h in self.handles:
            h.remove()
        if not self.broken:
            return None
        return (
            f"the torch.autograd.Function `{self.broken[0]}`, whose backward returned a gradient that is "
            "detached from the tensors it saved (NumPy, an extension kernel or .detach() inside backward), so "
            "its backward cannot be differentiated"
        )


def _refuse(problem: str) -> UnsupportedCriticError:
    return UnsupportedCriticError(
        f"The critic cannot be differentiated twice, which an exact gradient penalty needs: it uses {problem}. "
        "The penalty's backward would fail, or silently drop that op's second-order terms. "
        f"{INSTEAD}. For a cuDNN RNN (LSTM/GRU on CUDA), run the critic under "
        "torch.backends.cudnn.flags(enabled=False), whose RNN kernels have a double backward."
    )


def graph_checked(critic: Any, key: tuple[Any, ...] | None = None) -> bool:
    """The critic (by :func:`critic_key`, or its given ``key``) has passed :func:`check_graph` before."""
    return critic is not None and _graph_checked.has(critic, key)


def attention_context(critic: Any, key: tuple[Any, ...] | None = None) -> contextlib.AbstractContextManager[Any]:
    """:func:`math_attention` around a forward that will be differentiated twice; skipped (it costs a few
    µs) for a critic whose checked graph had no softmax on its input path, so no attention."""
    if not torch.compiler.is_compiling() and attention_free(critic, key):
        return NO_CONTEXT
    return math_attention()


def attention_free(critic: Any, key: tuple[Any, ...] | None = None) -> bool:
    """The critic's checked graph had no softmax on its input path (``False`` where not checked yet)."""
    return _attention.get(critic, key=key) is False


def _has_softmax(path: list[Any]) -> bool:
    """Attention on the input path: a softmax (SDPA's MATH kernel), or a fused SDPA kernel's node (a graph
    made outside the MATH context, as gradient_norms_from checks), which must not read as no attention."""
    return any("oftmax" in node.name() or "ScaledDotProduct" in node.name() for node in path)


def check_graph(
    critic: Any, out: Tensor, inputs: Iterable[Tensor], grads: Iterable[Tensor], watch: FunctionWatch | None = None
) -> None:
    """After the first backward (``create_graph=True``): refuse the critic if an op between its output
    ``out`` and ``inputs``, or in the graph of the input gradients ``grads``, has no double backward
    (``watch`` reports custom Functions whose backward left autograd). Walked once per critic key
    (``critic=None``: every time); later calls cost a set look-up.

    Raises:
        UnsupportedCriticError: naming the op and the alternatives.
    """
    problem = _graph_problem(out, tuple(inputs), grads, critic) or (watch.close() if watch is not None else None)
    if problem is not None:
        raise _refuse(problem)
    if critic is not None:
        _graph_checked.set(critic)


def probe_graph(critic: Any, inputs: tuple[Tensor, ...], call: CriticCall, key: tuple[Any, ...] | None = None) -> None:
    """:func:`check_graph` for the func backend, whose transforms hide the ops: once per critic, one
    sample goes through a plain autograd double-backward graph. The critic's buffers and the RNG
    are restored afterwards, so the probe leaves no trace (BatchNorm statistics, dropout draws).

    Raises:
        UnsupportedCriticError: naming the op and the alternatives.
    """
    if graph_checked(critic, key):
        return
    buffers = [(b, b.detach().clone()) for m in critic_modules(critic) for b in m.buffers()]
    device = inputs[0].device
    forked = [device] if device.type not in ("cpu", "meta") else []
    problem = None
    try:
        with torch.random.fork_rng(forked, device_type=device.type if forked else "cuda"), torch.enable_grad():
            xs = tuple(x[:1].detach().requires_grad_(True) for x in inputs)
            with math_attention():
                out = call.with_rows(tuple(r[:1] for r in call.rows()))(critic, *xs)
            if not (isinstance(out, Tensor) and out.requires_grad):
                return  # a bad output is reported by the backend; a constant one has nothing to differentiate
            watch = FunctionWatch(out, xs)
            grads = torch.autograd.grad(out.sum(), xs, create_graph=True, allow_unused=True)
            problem = _graph_problem(out, xs, grads, critic) or watch.close()
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if problem is not None:
        raise _refuse(problem)
    _graph_checked.set(critic)


# Messages of torch.func when vmap/grad cannot run an op of the critic.
_FUNC_LIMITS = ("vmap", "functorch transforms", "Batching rule", "torch.func")


def func_failure(e: RuntimeError) -> UnsupportedCriticError | None:
    """torch.func's failure to run an op of the critic as an :class:`UnsupportedCriticError` (``None`` for
    any other error, which is raised as it is)."""
    if isinstance(e, UnsupportedCriticError) or not any(s in str(e) for s in _FUNC_LIMITS):
        return None
    return UnsupportedCriticError(
        f"backend='func' cannot run this critic: torch.func.vmap/grad failed with '{str(e).splitlines()[0]}'. "
        "Use backend='autograd' (exact as long as the samples of a batch do not interact); or, if the op "
        f"also has no double backward, {INSTEAD[len('Instead: ') :]}."
    )
