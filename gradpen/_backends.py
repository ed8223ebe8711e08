"""How the per-sample input gradients are obtained.

A backend takes the critic, a tuple of input batches ``(N, *)`` and returns one gradient per
input, of the same shapes: row ``i`` is the gradient of sample ``i``'s summed critic output with
respect to sample ``i``'s inputs. Everything else (interpolation, norm, center, clamp,
reduction) lives in :mod:`gradpen._penalty` and is written once.

==========  ====================================================  ==============================
backend     how                                                   per-sample only when
==========  ====================================================  ==============================
autograd    ``autograd.grad(D(x).sum() * s, x, create_graph)``    samples do not interact
func        ``vmap(grad(lambda x_i: D(x_i[None]).sum() * s))``    always (each sample on its own)
==========  ====================================================  ==============================
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradpen._checks import check_critic_output

Backend = Callable[..., tuple[Tensor, ...]]


def batch_coupled_modules(critic: Any) -> list[str]:
    """Names of the BatchNorm layers of ``critic`` that normalise with batch statistics."""
    if not isinstance(critic, nn.Module):
        return []
    return [
        name or type(critic).__name__
        for name, m in critic.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]


def _under_compile(critic: Any) -> bool:
    """Inside a torch.compile region, or a critic made by ``torch.compile(module)``."""
    return torch.compiler.is_compiling() or (isinstance(critic, nn.Module) and hasattr(critic, "_orig_mod"))


def autograd_grads(
    critic: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    scale: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """One backward of the batch-summed output: per-sample as long as samples do not interact.

    torch.compile's AOTAutograd has no double backward, so under compile (a compiled region, or a
    compiled critic module) this routes to :func:`func_grads`, which gives the same answers.
    """
    if _under_compile(critic):
        return func_grads(critic, inputs, args, kwargs, scale, create_graph)
    coupled = batch_coupled_modules(critic)
    if coupled:
        warnings.warn(
            f"The critic has BatchNorm in training mode ({', '.join(coupled[:3])}), which couples the "
            "samples of a batch: each sample's input gradient then depends on the others and the "
            "gradient penalty is wrong (Gulrajani et al. 2017, Sec. 4). Use LayerNorm or GroupNorm "
            "in the critic, or no normalisation.",
            UserWarning,
            stacklevel=4,
        )
    n = inputs[0].shape[0]
    leaves = tuple(x.detach().requires_grad_(True) for x in inputs)
    with torch.enable_grad():
        total = check_critic_output(critic(*leaves, *args, **kwargs), n).sum()
        if scale is not None:
            total = total * scale
        return torch.autograd.grad(total, leaves, create_graph=create_graph)


def func_grads(
    critic: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    scale: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """``torch.func.vmap`` over ``torch.func.grad`` of the single-sample critic.

    Tensors in ``args``/``kwargs`` whose leading dimension is N (labels, conditions) are mapped
    over with the inputs; everything else is passed as is. Randomness (dropout) differs per sample.
    """
    coupled = batch_coupled_modules(critic)
    if coupled:
        raise ValueError(
            f"backend='func' cannot run a critic with BatchNorm in training mode ({', '.join(coupled[:3])}): "
            "vmap evaluates one sample at a time and batch statistics do not exist there. BatchNorm also "
            "makes the gradient penalty wrong (Gulrajani et al. 2017, Sec. 4). Use LayerNorm or GroupNorm "
            "in the critic, or put the BatchNorm layers in eval mode."
        )
    n = inputs[0].shape[0]

    def batched(v: Any) -> bool:
        return isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n

    arg_mask = tuple(batched(a) for a in args)
    kw_keys = tuple(k for k, v in kwargs.items() if batched(v))
    mapped_args = tuple(a for a, b in zip(args, arg_mask, strict=True) if b)
    mapped_kw = tuple(kwargs[k] for k in kw_keys)

    def one_sample(xs: tuple[Tensor, ...], margs: tuple[Tensor, ...], mkw: tuple[Tensor, ...]) -> Tensor:
        it = iter(margs)
        call_args = tuple(next(it)[None] if b else a for a, b in zip(args, arg_mask, strict=True))
        call_kw = dict(kwargs)
        call_kw.update({k: v[None] for k, v in zip(kw_keys, mkw, strict=True)})
        out = check_critic_output(critic(*(x[None] for x in xs), *call_args, **call_kw), 1)
        total = out.sum()
        return total if scale is None else total * scale

    per_sample = torch.func.vmap(torch.func.grad(one_sample), randomness="different")
    inputs = tuple(x.detach() for x in inputs)
    with torch.enable_grad() if create_graph else torch.no_grad():
        return per_sample(inputs, mapped_args, mapped_kw)


BACKENDS: dict[str, Backend] = {"autograd": autograd_grads, "func": func_grads}
