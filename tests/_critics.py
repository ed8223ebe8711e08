"""Hypothesis strategies for random critics: MLPs and small conv nets with smooth-ish activations."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}
# Smooth activations (a continuous derivative): the ones the fd backend is exact on.
SMOOTH = {"tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus, "silu": nn.SiLU, "gelu": nn.GELU}


class MapCritic(nn.Module):
    """Wraps a net so that it returns scores (N,) ("n"), (N, 1) ("n1") or a per-sample map ("map")."""

    def __init__(self, body: nn.Module, out: str):
        super().__init__()
        self.body, self.out = body, out

    def forward(self, x):
        y = self.body(x)
        return y.squeeze(1) if self.out == "n" else y


@st.composite
def critics(draw, dtype=torch.float64, smooth=False):
    """A (critic, input_shape) pair: an MLP on (D,) or (C, L) inputs, or a conv net on (C, H, W);
    ``smooth=True`` draws only activations with a continuous derivative."""
    kind = draw(st.sampled_from(["mlp", "conv"]))
    table = SMOOTH if smooth else ACTIVATIONS
    act = table[draw(st.sampled_from(sorted(table)))]
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if kind == "mlp":
        shape = draw(st.sampled_from([(3,), (5,), (2, 4), (3, 3)]))
        widths = draw(st.lists(st.integers(2, 8), min_size=1, max_size=2))
        layers: list[nn.Module] = [nn.Flatten()]
        d = 1
        for s in shape:
            d *= s
        for w in widths:
            layers += [nn.Linear(d, w), act()]
            d = w
        out = draw(st.sampled_from(["n", "n1"]))
        layers.append(nn.Linear(d, 1))
        body = nn.Sequential(*layers)
    else:
        c, hw = draw(st.integers(1, 2)), draw(st.sampled_from([4, 5]))
        shape = (c, hw, hw)
        width = draw(st.integers(2, 4))
        out = draw(st.sampled_from(["n1", "map"]))
        layers = [nn.Conv2d(c, width, 3, padding=1), act()]
        layers += (
            [nn.Conv2d(width, 1, 3, stride=2, padding=1)]
            if out == "map"
            else [nn.Conv2d(width, width, 3, stride=2, padding=1), act(), nn.Flatten(), nn.LazyLinear(1)]
        )
        body = nn.Sequential(*layers)
        body(torch.zeros(1, *shape))  # materialise LazyLinear
    critic = MapCritic(body, out).to(dtype)
    return critic, shape
