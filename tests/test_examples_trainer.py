"""examples/train_cifar.py and generate.py: smoke runs, exact resume, DDP, failures and bad flags.

Each run is a few tiny steps (dim 8, batch 8) on the bundled digits (mlp) or a generated folder (resnet).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import generate
import numpy as np
import pytest
import torch
import train_cifar

from tests._examples import EXAMPLES, TINY, assert_same_tensors, checkpoint_state, metric_records, run_digits

pytestmark = pytest.mark.slow
_run, _state = run_digits, checkpoint_state


def test_digits_smoke_run_writes_every_output(tmp_path):
    """A 4-step digits run writes sample grids, finite metrics (with an eval line) and a weights_only checkpoint."""
    out = _run(tmp_path, "--iters", "4", "--ckpt-every", "2")
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_000002.png", "iter_000004.png"]
    lines = metric_records(out)
    train_lines = [r for r in lines if not r.get("eval")]
    assert [r["iter"] for r in train_lines] == [1, 2, 3, 4]
    keys = ["loss_d", "wasserstein", "gp", "grad_norm", "loss_g", "lr", "img_per_s"]
    assert all(math.isfinite(r[k]) for r in train_lines for k in keys)
    evals = [r for r in lines if r.get("eval")]
    assert len(evals) == 1 and 1.0 <= evals[0]["digits_is"] <= 10.0 and 0 <= evals[0]["recognisable"] <= 1
    state = _state(out)
    assert state["iter"] == 4 and state["config"]["n_critic"] == 2 and state["channels"] == 1
    assert state["penalty"]["_extra_state"] == {"calls": 8}


def test_folder_dataset_smoke_run(tmp_path):
    """A folder of generated RGB images of odd sizes is resized, center-cropped and trained on."""
    from PIL import Image

    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    train_cifar.main([*TINY, "--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--iters", "2",
                      "--out", str(out)])  # fmt: skip
    assert (out / "samples" / "iter_000002.png").exists()
    assert _state(out)["channels"] == 3


def test_interrupted_and_resumed_run_matches_uninterrupted_bit_for_bit(tmp_path):
    """Stopping at step 3 and resuming reaches the same weights, optimizer, EMA and RNG state as one run."""
    common = ["--iters", "6", "--ckpt-every", "3", "--ema", "0.9", "--gp-every", "2", "--log-every", "2"]
    full = _run(tmp_path, *common, out="full")
    part = _run(tmp_path, *common, "--stop-at", "3", out="part")
    assert _state(part)["iter"] == 3
    _run(tmp_path, *common, "--resume", out="part")
    a, b = _state(full), _state(part)
    assert a["iter"] == b["iter"] == 6
    for key in ["generator", "critic", "ema", "opt_g", "opt_d", "sched_g", "penalty", "rng", "batches"]:
        assert_same_tensors(a[key], b[key], key)
    logs = [metric_records(run) for run in (full, part)]
    assert [r["iter"] for r in logs[1]] == [2, 4, 6, 6]  # one clean log, plus the final eval line
    for a_rec, b_rec in zip(*logs, strict=True):  # the log line at 4 spans steps 3 (before) and 4 (after the resume)
        assert {k: v for k, v in a_rec.items() if "second" not in k and k != "img_per_s"} == {
            k: v for k, v in b_rec.items() if "second" not in k and k != "img_per_s"
        }


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN critic output stops the run with a clear error; the checkpoint of step 2 is untouched."""
    out = _run(tmp_path, "--iters", "6", "--ckpt-every", "2", "--stop-at", "2")
    before = (out / "checkpoint.pt").read_bytes()
    forward = train_cifar.models.MLPCritic.forward
    monkeypatch.setattr(train_cifar.models.MLPCritic, "forward", lambda self, x: forward(self, x) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* the last good checkpoint .* is kept"):
        _run(tmp_path, "--iters", "6", "--ckpt-every", "2", "--resume")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_checkpoint_cannot_run_code(tmp_path):
    """A pickle that would run code is refused by the weights_only loader, in one line naming the file."""
    out = _run(tmp_path, "--iters", "1")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"generator": Evil()}, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*checkpoint.pt.*: it holds objects other than") as e:
        _run(tmp_path, "--iters", "2", "--resume")
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_generate_writes_uint8_nhwc_npz(tmp_path):
    """generate.py turns a checkpoint into arr_0: uint8 of shape (N, H, W, C)."""
    out = _run(tmp_path, "--iters", "1", "--ema", "0.5")
    generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--num", "7", "--batch", "3",
                   "--out", str(tmp_path / "s.npz")])  # fmt: skip
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (7, 8, 8, 1) and arr.dtype == np.uint8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gp-weight", "-1"], "--gp-weight must be >= 0, got -1.0"),
        (["--n-critic", "0"], "--n-critic must be >= 1, got 0"),
        (["--dataset", "folder"], "--data-dir is required with --dataset folder"),
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["--image-size", "48"], "--image-size must be 32 or 64 for --arch resnet, got 48"),
        (["--dataset", "digits", "--image-size", "64"], "--image-size must be 8 or 16 for --arch mlp, got 64"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--gp-weight", "nan"], "--gp-weight must be a finite number, got nan"),
        (["--gp-weight", "inf"], "--gp-weight must be a finite number, got inf"),
        (["--center", "nan"], "--center must be a finite number, got nan"),
        (["--center=-inf"], "--center must be a finite number, got -inf"),
        (["--batch-size", "1"], "--batch-size must be >= 2 (the generator has BatchNorm), got 1"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["--seed", str(2**64)], f"--seed must be in [0, 4294967295], got {2**64}"),
        (["--ema", "1.5"], "--ema must be in [0, 1), got 1.5"),
        (["--gp-every", "0"], "--gp-every must be >= 1, got 0"),
        (["--stop-at", "200000"], "--stop-at must be in [1, --iters=100000], got 200000"),
        (["--penalty", "r1", "--one-sided"], "--center/--one-sided do not apply to --penalty r1"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag(argv, message, capsys):
    """Bad arguments exit with status 2 and a single error line that names the flag."""
    with pytest.raises(SystemExit) as exc:
        train_cifar.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cifar10_offline_error_names_the_alternatives(tmp_path, monkeypatch):
    """Without the files and without a network, CIFAR-10 fails with a message naming digits and folder."""
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", offline)
    with pytest.raises(SystemExit, match=r"could not download CIFAR-10 .*--dataset digits.*--dataset folder"):
        train_cifar.load_images(train_cifar.parse_args(["--data-dir", str(tmp_path)]))


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    """torchrun with 2 gloo processes trains a few steps; the ranks end bit-identical and rank 0 checkpoints."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "train_cifar.py"), *TINY, "--dataset", "digits", "--iters", "3",
           "--out", str(tmp_path / "ddp")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP replicas identical: True (2 ranks" in proc.stdout
    state = _state(tmp_path / "ddp")
    assert state["world"] == 2 and len(state["rng"]) == 2 and state["iter"] == 3
