"""What ``critic_args`` and ``critic_kwargs`` mean, in one place for every entry point and backend.

The critic is called as ``critic(*inputs, *critic_args, **critic_kwargs)``. Each tensor found in
``critic_args``/``critic_kwargs`` (also inside nested tuples, lists and dicts) is either

- **per-sample**: row ``i`` belongs to sample ``i`` (labels, conditions, masks). Its leading
  dimension must be N. It is a constant: detached, never differentiated, never interpolated. The
  ``func`` backend hands each sample its own row; the ``autograd`` backend passes the batch whole.
- **shared**: the same value for every sample (an embedding table, a prototype matrix, a scalar).
  Passed as is to every call, so gradients flow into it like into the critic's parameters.

The rule, with no guessing from shapes: ``nn.Parameter``\\ s, 0-d tensors and tensors wrapped in
:func:`shared` are shared; every other tensor is per-sample, and one whose leading dimension is not
N is refused with an error that says how to mark it shared. A per-sample tensor that is a leaf
requiring grad (a learnable table that is not an ``nn.Parameter``, with N rows by chance) gets a
warning on every backend, since its gradient is dropped. Non-tensor values are passed as is; a list
or tuple of N non-tensor values (labels from a collate) is passed whole, so paths that call the
critic on another number of rows (one sample for ``func``, stacked copies for a fused estimate) do
not use it as per-sample: ``func`` says so, the estimators run one forward per point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from gradpen._checks import check_call_args


class Shared:
    """A tensor marked as shared by every sample of the batch; see :func:`gradpen.shared`."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"gradpen.shared({self.value!r})"


def shared(value: Tensor) -> Shared:
    r"""Mark a tensor in ``critic_args``/``critic_kwargs`` as shared by all samples.

    .. versionadded:: 0.2

    A tensor passed to the critic through ``critic_args`` or ``critic_kwargs`` is per-sample (row
    :math:`i` goes with sample :math:`i`) unless it is an ``nn.Parameter`` or 0-d. Wrap any other
    tensor that every sample uses whole, such as a class-prototype table computed in the training
    loop, in ``shared``: the critic then receives the tensor itself, unsliced and still attached to
    its graph, on every backend. This matters most when the table happens to have N rows, where
    nothing else could tell it from a per-sample tensor.

    Args:
        value (Tensor): the shared tensor.

    Returns:
        Shared: a marker; the critic is called with ``value`` in its place.

    Raises:
        TypeError: if ``value`` is not a tensor.

    Example::

        >>> protos = torch.randn(4, 3)  # 4 prototypes, and (by chance) 4 samples
        >>> critic = lambda x, p: (x @ p.T).logsumexp(dim=1)
        >>> x = torch.randn(4, 3)
        >>> args = (gradpen.shared(protos),)
        >>> by_func = gradpen.gradient_norms(critic, x, critic_args=args, backend="func")
        >>> by_autograd = gradpen.gradient_norms(critic, x, critic_args=args)
        >>> torch.allclose(by_func, by_autograd)
        True
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"`gradpen.shared` takes a Tensor, got {type(value).__name__}.")
    return Shared(value)


def _path(key_path: tuple[Any, ...]) -> str:
    """``critic_args[1][0]`` or ``critic_kwargs['cond']`` for a key path into ``(args, kwargs)``."""
    head = "critic_args" if key_path[0].idx == 0 else "critic_kwargs"
    return head + "".join(str(k) for k in key_path[1:])


@dataclass(frozen=True)
class CriticCall:
    """``critic_args``/``critic_kwargs`` resolved for a batch of N samples.

    ``leaves`` are the flattened arguments with :class:`Shared` unwrapped and per-sample tensors
    detached; ``per_sample[j]`` says whether leaf ``j`` is per-sample.
    """

    leaves: tuple[Any, ...]
    per_sample: tuple[bool, ...]
    spec: pytree.TreeSpec
    names: tuple[str, ...] = ()  # where each leaf came from: "critic_args[0]", "critic_kwargs['y']"
    sample_lists: bool = False  # a list/tuple of N non-tensor values is among the arguments

    def __call__(self, critic: Callable[..., Tensor], *inputs: Tensor) -> Any:
        """Call the critic on a batch: ``critic(*inputs, *critic_args, **critic_kwargs)``."""
        if self is _EMPTY:  # no critic_args or critic_kwargs: the common case, without the pytree
            return critic(*inputs)
        args, kwargs = pytree.tree_unflatten(list(self.leaves), self.spec)
        return critic(*inputs, *args, **kwargs)

    def rows(self) -> tuple[Tensor, ...]:
        """The per-sample tensors, in order (what a vmap maps over)."""
        return tuple(v for v, b in zip(self.leaves, self.per_sample, strict=True) if b)

    def with_rows(self, rows: tuple[Tensor, ...]) -> CriticCall:
        """The same call with the per-sample tensors replaced by ``rows`` (in :meth:`rows` order)."""
        if not rows and not any(self.per_sample):
            return self
        it = iter(rows)
        leaves = tuple(next(it) if b else v for v, b in zip(self.leaves, self.per_sample, strict=True))
        return CriticCall(leaves, self.per_sample, self.spec, self.names, self.sample_lists)

    def row_names(self) -> list[str]:
        """Where the per-sample tensors came from, in :meth:`rows` order (for messages)."""
        return [n for n, b in zip(self.names, self.per_sample, strict=True) if b]

    def tiled(self, times: int) -> CriticCall:
        """The call for a batch of ``times`` stacked copies of the samples (``torch.cat([x] * times)``)."""
        if times == 1:
            return self
        return self.with_rows(tuple(torch.cat([r] * times) for r in self.rows()))


def _has_sample_list(value: Any, n: int) -> bool:
    """A list or tuple of ``n`` non-tensor items (per-sample data that is not a tensor), at any depth."""
    if isinstance(value, dict):
        return any(_has_sample_list(v, n) for v in value.values())
    if isinstance(value, (list, tuple)):
        if len(value) == n and n > 1 and not any(isinstance(v, (Tensor, Shared, list, tuple, dict)) for v in value):
            return True
        return any(_has_sample_list(v, n) for v in value)
    return False


def resolve_critic_args(critic_args: Any, critic_kwargs: Any, n: int) -> CriticCall:
    """Validate ``critic_args``/``critic_kwargs`` and sort their tensors into per-sample and shared."""
    if critic_kwargs is None and type(critic_args) is tuple and not critic_args:  # the defaults
        return _EMPTY
    args, kwargs = check_call_args(critic_args, critic_kwargs)
    if not args and not kwargs:  # the common case, without the flattening
        return _EMPTY
    is_shared = lambda v: isinstance(v, Shared)
    keyed, spec = pytree.tree_flatten_with_path((args, kwargs), is_leaf=is_shared)
    leaves, mask, names = [], [], []
    for key_path, v in keyed:
        names.append(_path(key_path))
        if isinstance(v, Shared):
            leaves.append(v.value)
            mask.append(False)
        elif not isinstance(v, Tensor) or isinstance(v, nn.Parameter) or v.ndim == 0:
            leaves.append(v)
            mask.append(False)
        elif v.shape[0] != n:
            raise ValueError(
                f"`{_path(key_path)}` has leading dimension {v.shape[0]} (shape {tuple(v.shape)}), but "
                f"tensors in `critic_args`/`critic_kwargs` are per-sample and the batch has N={n}. If every "
                "sample uses this tensor whole, wrap it: gradpen.shared(tensor)."
            )
        else:
            if v.requires_grad and v.is_leaf:
                warnings.warn(
                    f"`{_path(key_path)}` is a leaf tensor that requires grad, with N={n} rows, so it is taken as "
                    "per-sample (row i for sample i) and used as a constant: the penalty's gradient does not reach "
                    "it. If it is a learnable table that every sample uses whole, pass gradpen.shared(tensor) "
                    "(or make it an nn.Parameter).",
                    UserWarning,
                    stacklevel=5,
                )
            leaves.append(v.detach())
            mask.append(True)
    lists = any(_has_sample_list(v, n) for v in (*args, *kwargs.values()))
    return CriticCall(tuple(leaves), tuple(mask), spec, tuple(names), lists)


_EMPTY = CriticCall((), (), pytree.tree_flatten(((), {}))[1])
