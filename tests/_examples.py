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


def assert_same_tensors(a, b, where=""):
    """Nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def metric_records(path):
    """Every record of a run's metrics.jsonl, training and evaluation lines, in order."""
    import json

    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def train_lines(path):
    """The training lines of a run's metrics.jsonl (not the evaluations), without the timing field."""
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in metric_records(path) if not r.get("eval")]


def torchrun_digits(tmp_path, *extra, out="run", nproc=2):
    """A tiny digits run under ``torchrun --nproc_per_node=nproc`` (gloo, 1 thread per process): CompletedProcess."""
    import os
    import subprocess

    script = str(EXAMPLES / "train_cifar.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *TINY, "--dataset", "digits", "--out", str(tmp_path / out), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
