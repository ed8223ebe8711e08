"""examples/train_cifar.py --fsdp: the critic sharded with FSDP2 (gloo, CPU), approx-r1 trains, exact penalties refused.

The 2-process runs go through torchrun (1 thread each); the 1-process runs call main() in this process.
"""

from __future__ import annotations

import generate
import numpy as np
import pytest
import torch.distributed as dist

from tests._examples import assert_same_tensors, checkpoint_state, run_digits, torchrun_digits, train_lines

pytestmark = pytest.mark.slow
# --iters 5 with --stop-at: no run reaches the end, so none trains the digits scorer (seconds per process)
FSDP = ["--critic", "vit", "--penalty", "approx-r1", "--fsdp", "--gp-every", "2", "--ckpt-every", "2", "--iters", "5"]
STATE_KEYS = ["generator", "critic", "ema", "opt_g", "opt_d", "sched_g", "sched_d", "penalty", "rng", "batches", "log"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One uninterrupted 4-step FSDP run on 2 processes, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("fsdp")
    proc = _ok(torchrun_digits(tmp, *FSDP, "--stop-at", "4", "--ema", "0.9", out="full"))
    return tmp / "full", proc


def test_fsdp_two_processes_train_and_resume_bit_for_bit(fsdp_run, tmp_path):
    """0->2, then --resume 2->4 on 2 FSDP processes ends with the state, log and samples of the run 0->4;
    the checkpoint is a weights_only file holding the full critic, and generate.py samples from it."""
    full, proc = fsdp_run
    assert "DDP replicas identical: True (2 ranks" in proc.stdout and "the critic is sharded (FSDP)" in proc.stdout
    _ok(torchrun_digits(tmp_path, *FSDP, "--ema", "0.9", "--stop-at", "2", out="part"))
    assert checkpoint_state(tmp_path / "part")["iter"] == 2
    assert "resumed from" in _ok(torchrun_digits(tmp_path, *FSDP, "--stop-at", "4", "--resume", out="part")).stdout
    a, b = checkpoint_state(full), checkpoint_state(tmp_path / "part")
    for key in STATE_KEYS:
        assert_same_tensors(a[key], b[key], key)
    assert train_lines(full) == train_lines(tmp_path / "part") and len(train_lines(full)) == 4
    assert (
        a["iter"] == b["iter"] == 4
        and a["world"] == 2
        and a["config"]["fsdp"]
        and a["critic"]["pos"].shape == (1, 16, 8)
    )  # unsharded
    assert set(a["opt_d"]["state"]) == set(a["critic"])  # the full optimizer state, keyed by parameter name
    generate.main(["--checkpoint", str(full / "checkpoint.pt"), "--num", "3", "--out", str(tmp_path / "s.npz")])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 1)


def test_fsdp_two_processes_equal_ddp_bit_for_bit(fsdp_run, tmp_path):
    """The same run with the critic under DDP instead of FSDP reaches bit-identical weights and optimizer state."""
    full, _ = fsdp_run
    ddp = [x for x in FSDP if x != "--fsdp"]
    _ok(torchrun_digits(tmp_path, *ddp, "--stop-at", "4", "--ema", "0.9", out="ddp"))
    a, b = checkpoint_state(full), checkpoint_state(tmp_path / "ddp")
    for key in ["generator", "critic", "ema"]:
        assert_same_tensors(a[key], b[key], key)
    assert train_lines(full) == train_lines(tmp_path / "ddp")


def test_fsdp_exact_penalty_exits_at_startup_with_one_line(tmp_path):
    """--fsdp --penalty wgan-gp on 2 processes stops before any step, with gradpen's one line naming FSDP and
    the alternatives (printed once, by rank 0), no trainer traceback and no checkpoint."""
    proc = torchrun_digits(tmp_path, "--critic", "vit", "--fsdp", "--penalty", "wgan-gp", "--iters", "2")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("train_cifar.py: error:")]
    assert len(ours) == 1
    assert "--penalty wgan-gp --backend autograd --fsdp: An exact gradient penalty cannot run through FSDP" in ours[0]
    assert "gradpen.approx_r1_penalty" in ours[0] and "--penalty approx-r1" in ours[0]
    assert 'train_cifar.py", line' not in proc.stderr  # torchrun reports the exit status; the trainer no traceback
    assert "iter " not in proc.stdout and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_fsdp_on_one_process_equals_the_unsharded_run(tmp_path, capsys):
    """--fsdp without torchrun (a 1-process group) trains bit-identically to the same run without --fsdp;
    an exact penalty is refused there too, with exit status 2, before any step."""
    common = ["--critic", "vit", "--penalty", "approx-r1", "--iters", "3", "--stop-at", "2", "--sample-every", "100"]
    a = checkpoint_state(run_digits(tmp_path, *common, "--fsdp", out="fsdp"))
    b = checkpoint_state(run_digits(tmp_path, *common, out="plain"))
    for key in ["generator", "critic", "ema", "rng"]:
        assert_same_tensors(a[key], b[key], key)
    assert not dist.is_initialized()  # the run took its process group down
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_digits(tmp_path, "--critic", "vit", "--fsdp", "--penalty", "r1", out="exact")
    assert e.value.code == 2 and not dist.is_initialized()
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "--penalty r1 --backend autograd --fsdp: An exact gradient penalty cannot run" in err
    )


def test_fsdp_on_one_process_resumes_with_resume_alone_bit_for_bit(tmp_path, capsys, monkeypatch):
    """A 1-process --fsdp run stopped at step 1 and continued with --resume alone (the checkpoint's --fsdp sets up
    the process group) finishes with the state and log of the uninterrupted run, and takes its group down."""
    import train_cifar

    evaluated = []  # the digits scorer trains a classifier on first use: seconds to minutes, and not the point here
    monkeypatch.setattr(train_cifar, "evaluate", lambda args, g, images, device, it, *rest: evaluated.append(it))
    common = ["--critic", "vit", "--penalty", "approx-r1", "--fsdp", "--iters", "3", "--sample-every", "100"]
    full = run_digits(tmp_path, *common, out="full")
    run_digits(tmp_path, *common, "--stop-at", "1", out="part")
    assert checkpoint_state(tmp_path / "part")["iter"] == 1 and not dist.is_initialized()
    capsys.readouterr()
    part = run_digits(tmp_path, "--resume", out="part")  # no --fsdp, --critic, --penalty or --iters
    assert "resumed from" in capsys.readouterr().out and not dist.is_initialized()
    a, b = checkpoint_state(full), checkpoint_state(part)
    for key in STATE_KEYS:
        assert_same_tensors(a[key], b[key], key)
    assert a["iter"] == b["iter"] == 3 and b["config"]["fsdp"] and b["world"] == 1 and evaluated == [3, 3]
    assert train_lines(full) == train_lines(part) and len(train_lines(full)) == 3
