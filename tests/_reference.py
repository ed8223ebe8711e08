"""Slow, obviously correct references: one sample at a time, no batching tricks, no gradpen code.

These are what every backend is checked against.
"""

from __future__ import annotations

import torch


def per_sample_grads(critic, inputs, critic_args=(), create_graph=True):
    """Input gradients one sample at a time: row i is d(sum of critic(x_i))/d x_i."""
    n = inputs[0].shape[0]
    rows = []
    for i in range(n):
        xi = [x[i : i + 1].detach().clone().requires_grad_(True) for x in inputs]
        args_i = [a[i : i + 1] if torch.is_tensor(a) and a.ndim and a.shape[0] == n else a for a in critic_args]
        out = critic(*xi, *args_i).sum()
        rows.append(torch.autograd.grad(out, xi, create_graph=create_graph))
    return [torch.cat([r[k] for r in rows]) for k in range(len(inputs))]


def per_sample_norms(critic, inputs, critic_args=(), create_graph=True):
    """sqrt of the sum of squares over every non-batch element of every input, sample by sample."""
    grads = per_sample_grads(critic, inputs, critic_args, create_graph)
    return torch.stack([sum(g[i].pow(2).sum() for g in grads).sqrt() for i in range(inputs[0].shape[0])])


def finite_difference_norms(critic, inputs, critic_args=(), h=1e-6):
    """Central differences of each sample's summed output, element by element (float64)."""
    n = inputs[0].shape[0]
    sq = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for k, x in enumerate(inputs):
            flat = x.detach().reshape(n, -1)
            for j in range(flat.shape[1]):
                step = torch.zeros_like(flat)
                step[:, j] = h

                def f(delta, k=k, x=x, flat=flat):
                    moved = list(inputs)
                    moved[k] = (flat + delta).reshape(x.shape)
                    out = critic(*moved, *critic_args)
                    return out.reshape(n, -1).sum(1)

                sq += ((f(step) - f(-step)) / (2 * h)) ** 2
    return sq.sqrt()


def interpolate(real, fake, alpha):
    return [
        alpha.view(-1, *[1] * (r.ndim - 1)) * r + (1 - alpha.view(-1, *[1] * (r.ndim - 1))) * f
        for r, f in zip(real, fake, strict=True)
    ]


def wgan_gp(critic, real, fake, alpha, center=1.0, one_sided=False, critic_args=()):
    """The WGAN-GP penalty, per sample, by the loop above."""
    norms = per_sample_norms(critic, interpolate(real, fake, alpha), critic_args)
    excess = norms - center
    if one_sided:
        excess = torch.where(excess > 0, excess, torch.zeros_like(excess))
    return excess**2, norms
