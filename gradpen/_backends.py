"""How the per-sample input gradients are obtained.

A backend takes the critic, a tuple of input batches ``(N, *)``, the resolved critic arguments
(:class:`gradpen._args.CriticCall`) and a seed, and returns one gradient per input, of the same
shapes: row ``i`` is ``seed`` times the gradient of sample ``i``'s summed critic output with respect
to sample ``i``'s inputs. Everything else (interpolation, norm, center, clamp, reduction) lives in
:mod:`gradpen._penalty` and is written once.

==========  ====================================================  ==============================
backend     how                                                   per-sample only when
==========  ====================================================  ==============================
autograd    ``autograd.grad(D(x), x, seed, create_graph)``        samples do not interact
func        ``vmap(grad(lambda x_i: D(x_i[None]).sum() * s))``    always (each sample on its own)
==========  ====================================================  ==============================

Both give zeros for inputs the critic does not depend on, and both treat per-sample critic
arguments as constants. Both first run the guards of :mod:`gradpen._guards` (FSDP and static-graph
DDP are refused before any work), run the critic with ``scaled_dot_product_attention`` on its MATH
kernel (the only one with a double backward), and refuse, once per critic, a graph holding an op
without a double backward: ``autograd`` walks the graph of its first backward, ``func`` sends one
sample through a plain autograd double-backward graph, since its transforms hide the ops.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradpen._args import CriticCall
from gradpen._checks import check_critic_output
from gradpen._guards import (
    batch_coupled_modules,
    check_exact_critic,
    check_graph,
    func_limits,
    math_attention,
    probe_graph,
)

Backend = Callable[..., tuple[Tensor, ...]]


def _under_compile(critic: Any) -> bool:
    """Inside a torch.compile region, or a critic made by ``torch.compile(module)``."""
    return torch.compiler.is_compiling() or (isinstance(critic, nn.Module) and hasattr(critic, "_orig_mod"))


def autograd_grads(
    critic: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    call: CriticCall,
    seed: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """One backward of the batch output: per-sample as long as samples do not interact.

    torch.compile's AOTAutograd has no double backward, so under compile (a compiled region, or a
    compiled critic module) this routes to :func:`func_grads`, which gives the same answers.

    Raises:
        UnsupportedCriticError: for FSDP or static-graph DDP (before any work), or an op without a
            double backward (after the first backward, the first time this critic is seen).
    """
    if _under_compile(critic):
        return func_grads(critic, inputs, call, seed, create_graph)
    check_exact_critic(critic)
    coupled = batch_coupled_modules(critic)
    if coupled:
        warnings.warn(
            f"The critic has BatchNorm in training mode ({', '.join(coupled[:3])}), which couples the "
            "samples of a batch: each sample's input gradient then depends on the others and the "
            "gradient penalty is wrong (Gulrajani et al. 2017, Sec. 4). Use LayerNorm or GroupNorm "
            "in the critic, or no normalisation.",
            UserWarning,
            stacklevel=5,
        )
    n = inputs[0].shape[0]
    leaves = tuple(x.detach().requires_grad_(True) for x in inputs)
    with torch.enable_grad():
        with math_attention():
            out = check_critic_output(call(critic, *leaves), n)
        grads = input_grads(out, leaves, seed, create_graph)
    if create_graph and out.requires_grad:
        check_graph(critic, out, grads)
    return grads


def input_grads(
    out: Tensor, inputs: tuple[Tensor, ...], seed: Tensor | None, create_graph: bool, retain_graph: bool = False
) -> tuple[Tensor, ...]:
    """``seed`` times the gradient of ``out.sum()`` w.r.t. each of ``inputs``; zeros where it does not
    depend on one (a critic that ignores an input, or a constant)."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(x) for x in inputs)
    grad_out = torch.ones_like(out) if seed is None else seed.to(out.dtype).expand_as(out)
    grads = torch.autograd.grad(
        out, inputs, grad_out, create_graph=create_graph, retain_graph=retain_graph or create_graph, allow_unused=True
    )
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True))


def func_grads(
    critic: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    call: CriticCall,
    seed: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """``torch.func.vmap`` over ``torch.func.grad`` of the single-sample critic.

    The per-sample critic arguments are mapped over with the inputs (each sample gets its row);
    shared ones are passed whole. Randomness (dropout) differs per sample.

    Raises:
        UnsupportedCriticError: for FSDP or static-graph DDP, an op without a double backward (the
            first time this critic is seen; outside torch.compile), or an op vmap cannot run.
    """
    check_exact_critic(critic)
    coupled = batch_coupled_modules(critic)
    if coupled:
        raise ValueError(
            f"backend='func' cannot run a critic with BatchNorm in training mode ({', '.join(coupled[:3])}): "
            "vmap evaluates one sample at a time and batch statistics do not exist there. BatchNorm also "
            "makes the gradient penalty wrong (Gulrajani et al. 2017, Sec. 4). Use LayerNorm or GroupNorm "
            "in the critic, or put the BatchNorm layers in eval mode."
        )

    def one_sample(xs: tuple[Tensor, ...], rows: tuple[Tensor, ...]) -> Tensor:
        out = check_critic_output(call.with_rows(tuple(r[None] for r in rows))(critic, *(x[None] for x in xs)), 1)
        total = out.sum()
        return total if seed is None else total * seed

    per_sample = torch.func.vmap(torch.func.grad(one_sample), randomness="different")
    inputs = tuple(x.detach() for x in inputs)
    if create_graph and not _under_compile(critic):
        probe_graph(critic, inputs, call)
    with torch.enable_grad() if create_graph else torch.no_grad(), math_attention(), func_limits():
        return per_sample(inputs, call.rows())


BACKENDS: dict[str, Backend] = {"autograd": autograd_grads, "func": func_grads}
