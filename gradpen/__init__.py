"""gradpen: gradient penalties for GAN critics, per sample, tested against finite differences.

The public surface is what ``__all__`` lists; every other module is private.
"""

# First (ruff's isort keeps plain imports ahead): below the floor, one clear ImportError.
import gradpen._compat  # noqa: F401
from gradpen._approx import (
    approx_gradient_penalty,
    approx_r1_penalty,
    approx_r2_penalty,
    approx_squared_norms_from,
)
from gradpen._args import shared
from gradpen._backends import FiniteDifference
from gradpen._diagnose import BackendComparison, compare_backends
from gradpen._from import gradient_norms_from
from gradpen._guards import UnsupportedCriticError
from gradpen._module import GradientPenalty, lazy_adam_kwargs
from gradpen._penalty import (
    dragan_penalty,
    gradient_norms,
    gradient_penalty,
    interpolate,
    r1_penalty,
    r2_penalty,
    wgan_div_penalty,
)

__version__ = "0.3.0"

__all__ = [
    "BackendComparison",
    "FiniteDifference",
    "GradientPenalty",
    "UnsupportedCriticError",
    "__version__",
    "approx_gradient_penalty",
    "approx_r1_penalty",
    "approx_r2_penalty",
    "approx_squared_norms_from",
    "compare_backends",
    "dragan_penalty",
    "gradient_norms",
    "gradient_norms_from",
    "gradient_penalty",
    "interpolate",
    "lazy_adam_kwargs",
    "r1_penalty",
    "r2_penalty",
    "shared",
    "wgan_div_penalty",
]
