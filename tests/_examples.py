"""Import helpers for the example scripts, which live outside the package, and the trainer tests' tiny runs."""

import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

# The smallest trainer configuration the tests run: seconds per run on the CPU.
TINY = ["--dim", "8", "--batch-size", "8", "--n-critic", "2", "--log-every", "1", "--sample-every", "2",
        "--eval-samples", "20"]  # fmt: skip


def run_digits(tmp_path, *extra, out="run"):
    """A tiny digits run of examples/train_cifar.py into ``tmp_path / out``; ``extra`` flags override TINY."""
    import train_cifar

    train_cifar.main([*TINY, "--dataset", "digits", "--out", str(tmp_path / out), *extra])
    return tmp_path / out


def checkpoint_state(path):
    """The checkpoint of a run, loaded as the trainer does (weights only)."""
    return torch.load(path / "checkpoint.pt", weights_only=True)
