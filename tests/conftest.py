"""Fixtures and hypothesis profiles for the test suite.

``GRADPEN_TEST_DEVICES`` (default ``"cpu,cuda"``) chooses the devices of the ``device`` fixture;
CUDA is skipped cleanly where it is not available. ``HYPOTHESIS_PROFILE`` picks ``dev`` (default),
``ci`` (the same, derandomised) or ``thorough`` (ten times the examples).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import tests._examples  # noqa: F401  (puts examples/ on sys.path before the example tests import from it)

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("dev", max_examples=25, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=250, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

DEVICES = [d.strip() for d in os.environ.get("GRADPEN_TEST_DEVICES", "cpu,cuda").split(",") if d.strip()]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device in GRADPEN_TEST_DEVICES; CUDA is skipped where it is not available."""
    if request.param.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    return torch.device(request.param)
