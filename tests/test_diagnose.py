"""compare_backends: the backends agree on a plain critic, and the odd one out shows where gradpen cannot
detect a problem by itself; the critic is left as it was."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import gradpen

F64 = {"dtype": torch.float64}


def test_backends_agree_on_a_smooth_critic_and_leave_no_trace():
    """On a smooth float64 critic the three backends agree to 1e-6 and equal r1_penalty's value; the critic's
    .grad, buffers and the RNG are as before; str() is a table naming every backend."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1)).double()
    x = torch.randn(8, 4, **F64)
    critic[0].weight.grad = torch.ones_like(critic[0].weight)
    rng = torch.get_rng_state()
    report = gradpen.compare_backends(critic, x)
    assert sorted(report.grads) == ["autograd", "fd", "func"] and not report.errors
    assert report.agree(tol=1e-6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(critic[0].weight.grad, torch.ones_like(critic[0].weight))
    # dropout: each backend started from the same RNG state, so autograd's value is r1_penalty's from that state
    torch.set_rng_state(rng)
    assert report.values["autograd"] == gradpen.r1_penalty(critic, x).item()
    assert all(name in str(report) for name in ("autograd", "func", "fd"))


class _HiddenNumpyTanh(torch.autograd.Function):
    """tanh whose backward reads a NumPy copy kept on ctx (no saved tensors): right once, not differentiable,
    and invisible to gradpen's watch, which looks at what a Function saved."""

    @staticmethod
    def forward(ctx, x):
        ctx.value = np.tanh(x.detach().numpy())
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        return g * torch.from_numpy(1 - ctx.value**2)


def test_a_silently_wrong_backend_is_the_odd_one_out():
    """A Function whose backward leaves autograd without saving tensors is not refused (gradpen cannot see it),
    but compare_backends shows autograd disagreeing with fd (func cannot run the Function at all)."""
    torch.manual_seed(2)
    lin1, lin2 = nn.Linear(3, 16).double(), nn.Linear(16, 1).double()
    critic = lambda x: lin2(torch.tanh(_HiddenNumpyTanh.apply(lin1(x))))
    report = gradpen.compare_backends(critic, torch.randn(8, 3, **F64))
    assert "func" in report.errors
    assert report.difference("autograd", "fd") > 1e-2
    assert not report.agree()


def test_refusals_are_reported_not_raised():
    """A kinked critic: fd's refusal is in .errors with its message; the exact backends agree."""
    critic = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    report = gradpen.compare_backends(critic, torch.randn(8, 3, **F64))
    assert "piecewise-linear" in report.errors["fd"]
    assert report.agree(tol=1e-12)
