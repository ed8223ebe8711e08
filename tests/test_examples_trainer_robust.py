"""examples/train_cifar.py and generate.py: resume rules, logs, one-line errors, fp16 overflow, folder edge cases.

Each run is a few tiny steps (the mlp digits networks, dim 8, batch 8) on the bundled digits or a generated folder.
"""

from __future__ import annotations

import errno

import generate
import numpy as np
import pytest
import torch
import train_cifar

from tests._examples import checkpoint_state, metric_records, run_digits

pytestmark = pytest.mark.slow
_state = checkpoint_state


def _run(tmp_path, *extra, out="run"):
    return run_digits(tmp_path, "--sample-every", "100", *extra, out=out)


def _one_line_exit(exc_info, code=None):
    """The SystemExit carried one line (as a message, or printed with a status code)."""
    if code is not None:
        assert exc_info.value.code == code
    msg = exc_info.value.code if isinstance(exc_info.value.code, str) else ""
    assert "\n" not in msg.strip()
    return msg


# ----------------------------------------------------------------------------- B: resume and logs


def test_resume_refuses_flags_that_differ_from_the_checkpoint(tmp_path, capsys):
    """A resume with --dim and --gp-weight unlike the checkpoint's exits 2 naming both flags and both values."""
    _run(tmp_path, "--iters", "4", "--stop-at", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--iters", "4", "--resume", "--dim", "16", "--gp-weight", "5")
    _one_line_exit(e, code=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--dim 16 (checkpoint: 8)" in err and "--gp-weight 5.0 (checkpoint: 10.0)" in err


def test_resume_applies_a_new_lr_and_records_it(tmp_path, capsys):
    """--lr on resume is applied to both optimizers, saved in the config and recorded with its old value."""
    _run(tmp_path, "--iters", "3", "--stop-at", "1", "--lr-decay", "none")
    _run(tmp_path, "--iters", "3", "--resume", "--lr", "2e-3")
    assert "applied --lr 0.002 (the checkpoint had 0.001)" in capsys.readouterr().out
    state = _state(tmp_path / "run")
    assert state["config"]["lr"] == 2e-3
    assert state["applied"] == [{"iter": 1, "flag": "--lr", "old": 1e-3, "new": 2e-3}]
    assert [g["lr"] for k in ("opt_g", "opt_d") for g in state[k]["param_groups"]] == [2e-3, 2e-3]
    assert metric_records(tmp_path / "run")[-2]["lr"] == 2e-3


def test_resume_keeps_the_checkpoints_ema_and_refuses_to_drop_it(tmp_path, capsys):
    """Without --ema the checkpoint's EMA continues; --ema 0 on resume is refused, not a silent drop."""
    _run(tmp_path, "--iters", "3", "--stop-at", "1", "--ema", "0.9")
    before = _state(tmp_path / "run")["ema"]
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--iters", "3", "--resume", "--ema", "0")
    _one_line_exit(e, code=2)
    assert "--ema 0.0 (checkpoint: 0.9)" in capsys.readouterr().err
    _run(tmp_path, "--iters", "3", "--resume")
    after = _state(tmp_path / "run")
    assert after["config"]["ema"] == 0.9 and after["ema"] is not None
    assert any(not torch.equal(before[k], after["ema"][k]) for k in before)  # it kept averaging


def test_stop_at_before_the_checkpoint_is_an_error(tmp_path, capsys):
    """--stop-at at or before the checkpoint's step exits 2 with one line, instead of running to --iters."""
    _run(tmp_path, "--iters", "6", "--stop-at", "3")
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--iters", "6", "--resume", "--stop-at", "2")
    _one_line_exit(e, code=2)
    assert "--stop-at 2 is not after the checkpoint's step 3" in capsys.readouterr().err
    assert _state(tmp_path / "run")["iter"] == 3


def test_fresh_run_over_an_old_log_starts_it_anew(tmp_path):
    """A fresh run in an --out holding a log but no checkpoint does not append to the old log."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iter": 1, "loss_d": 123.0}\n{"iter": 9, "loss_d": 456.0}\n')
    _run(tmp_path, "--iters", "2")
    lines = metric_records(out)
    assert [r["iter"] for r in lines] == [1, 2, 2] and all(r.get("loss_d") not in (123.0, 456.0) for r in lines)


def test_half_written_last_log_line_does_not_block_resume(tmp_path, capsys):
    """A truncated last line of metrics.jsonl (power loss) is dropped with a warning; the resume runs."""
    out = _run(tmp_path, "--iters", "4", "--stop-at", "2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3, "loss_d": -0.1')
    _run(tmp_path, "--iters", "4", "--resume")
    assert "not a complete JSON record" in capsys.readouterr().err
    assert [r["iter"] for r in metric_records(out)] == [1, 2, 3, 4, 4]


def test_resuming_a_finished_run_does_nothing(tmp_path, capsys):
    """--resume on a checkpoint at --iters neither trains nor evaluates again; the log is unchanged."""
    out = _run(tmp_path, "--iters", "2")
    log = (out / "metrics.jsonl").read_text()
    _run(tmp_path, "--iters", "2", "--resume")
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == log


def test_logged_gp_is_the_mean_penalty_applied_over_all_critic_steps(tmp_path, monkeypatch):
    """With --gp-every 2 --n-critic 2 each log line's gp is the mean of what the penalty returned in its steps."""
    returned = []

    class Recording(train_cifar.gradpen.GradientPenalty):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            returned.append(float(out.detach()))
            return out

    monkeypatch.setattr(train_cifar.gradpen, "GradientPenalty", Recording)
    out = _run(tmp_path, "--iters", "4", "--gp-every", "2", "--log-every", "2")
    logged = [r["gp"] for r in metric_records(out) if not r.get("eval")]
    assert returned[1::2] == [0.0] * 4 and all(v > 0 for v in returned[0::2])  # lazy: every other call
    assert logged == pytest.approx([np.mean(returned[:4]), np.mean(returned[4:])], rel=1e-12)


def test_save_atomic_removes_its_temporary_file_and_names_the_cause(tmp_path, monkeypatch):
    """A full disk during the write: the old file stays, the temporary file is removed, one line says why."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_cifar.torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"could not write .*checkpoint.pt.*: No space left on device") as e:
        train_cifar.save_atomic({"x": 1}, path)
    _one_line_exit(e)
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ----------------------------------------------------------------------------- C: errors


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"", "the file is empty"),
        (lambda b: b[: len(b) // 2], "truncated, corrupt or not a PyTorch checkpoint"),
        (lambda b: bytes(range(256)) * 4, "corrupt or not a PyTorch checkpoint"),
    ],
    ids=["empty", "truncated", "garbage"],
)
def test_damaged_checkpoint_gives_one_line_naming_the_file(tmp_path, damage, message):
    """Empty, truncated and garbage checkpoints fail in one line that names the file, with no weights_only advice."""
    out = _run(tmp_path, "--iters", "1")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(damage(ckpt.read_bytes()))
    for call in (lambda: _run(tmp_path, "--iters", "2", "--resume"),
                 lambda: generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "s.npz")])):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            call()
        msg = _one_line_exit(e)
        assert str(ckpt) in msg and message in msg and "weights_only" not in msg


def test_checkpoint_of_another_network_gives_one_line_naming_the_mismatch(tmp_path):
    """Weights of --dim 8 into a --dim 16 network: one line with the tensor and both shapes, no state_dict dump."""
    out = _run(tmp_path, "--iters", "1")
    state = _state(out)
    gen, _ = train_cifar.models.build("mlp", 16, 8, 1)
    with pytest.raises(SystemExit, match=r"does not fit --arch mlp --dim 16 --image-size 8: its generator") as e:
        train_cifar.load_weights(gen, state["generator"], "generator", out / "checkpoint.pt",
                                 {"arch": "mlp", "dim": 16, "image_size": 8})  # fmt: skip
    _one_line_exit(e)
    state["config"]["dim"] = 16  # a config that does not match its weights
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"does not fit --arch mlp --dim 16"):
        generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.npz")])


def test_fp16_overflow_skipped_by_the_grad_scaler_does_not_stop_the_run(tmp_path, monkeypatch):
    """CPU fp16 autocast with a scale of 2**40: the first steps overflow, the scaler lowers the scale, the run ends."""
    scalers = []

    class HugeScale(torch.amp.GradScaler):
        def __init__(self, device, enabled=True):
            super().__init__(device, init_scale=2.0**40, enabled=enabled)
            scalers.append(self)

    monkeypatch.setattr(train_cifar.torch.amp, "GradScaler", HugeScale)
    out = _run(tmp_path, "--iters", "12", "--amp", "fp16", "--device", "cpu")
    state = _state(out)
    assert scalers[0].get_scale() < 2.0**40 / 2**3  # it skipped several overflowing steps
    assert all(torch.isfinite(v).all() for v in state["generator"].values() if v.is_floating_point())
    logs = [r for r in metric_records(out) if not r.get("eval")]
    assert all(np.isfinite(r["loss_d"]) for r in logs) and logs[-1]["scale"] < 2.0**40


def test_fp16_real_divergence_still_stops(tmp_path, monkeypatch):
    """Under fp16 a critic that only returns NaN is a divergence: the run stops after the overflow streak."""
    forward = train_cifar.models.MLPCritic.forward
    monkeypatch.setattr(train_cifar.models.MLPCritic, "forward", lambda self, x: forward(self, x) * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss or weights"):
        _run(tmp_path, "--iters", "40", "--amp", "fp16", "--device", "cpu")


def test_divergence_message_says_which_checkpoint_is_kept(tmp_path, monkeypatch):
    """A NaN critic at step 1 says no checkpoint was written yet (and none is); one that turns NaN after the
    checkpoint of step 1 (--ckpt-every 1) names that checkpoint and its step, and the file holds step 1."""
    forward, state = train_cifar.models.MLPCritic.forward, {"nan": False}
    monkeypatch.setattr(train_cifar.models.MLPCritic, "forward",
                        lambda self, x: forward(self, x) * (float("nan") if state["nan"] else 1.0))  # fmt: skip
    state["nan"] = True
    with pytest.raises(FloatingPointError, match=r"; no checkpoint was written yet \(--ckpt-every 1000\)$"):
        _run(tmp_path, "--iters", "3", out="early")
    assert not (tmp_path / "early" / "checkpoint.pt").exists()
    save = train_cifar.save_atomic

    def save_then_diverge(obj, path):
        save(obj, path)
        state["nan"] = True

    state["nan"] = False
    monkeypatch.setattr(train_cifar, "save_atomic", save_then_diverge)
    ckpt = tmp_path / "late" / "checkpoint.pt"
    with pytest.raises(FloatingPointError, match="between generator steps 2 and 2") as e:
        _run(tmp_path, "--iters", "3", "--ckpt-every", "1", out="late")
    assert str(e.value).endswith(f"; the last good checkpoint {ckpt} (generator step 1) is kept")
    assert _state(tmp_path / "late")["iter"] == 1


@pytest.mark.parametrize("sigma", ["1e-300", "1e-7", "9.9e-5"])
def test_approx_sigma_below_float32_resolution_gives_one_line_naming_the_flag(sigma, capsys):
    """An --approx-sigma below 1e-4 (the float32 quotient's rounding error eps32*|D|/sigma > ~1 %) exits 2 at
    flag-check time with one line naming the flag, the bound and the reason; 1e-4 itself is accepted."""
    with pytest.raises(SystemExit) as exc:
        train_cifar.parse_args(["--dataset", "digits", "--penalty", "approx-r1", "--approx-sigma", sigma])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--approx-sigma must be >= 0.0001, got {float(sigma):g}: in float32" in err
    assert "rounding error of about 1.19e-7*|D|/sigma" in err
    assert train_cifar.parse_args(["--dataset", "digits", "--penalty", "approx-r1", "--approx-sigma", "1e-4"])


def _folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_folder_skips_unreadable_files_with_a_warning_naming_each(tmp_path, capsys):
    """A truncated PNG, a directory named x.png and a macOS ._ file are skipped, each named in a warning."""
    folder = _folder(tmp_path)
    good = (folder / "0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "dir.png").mkdir()
    (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    images = train_cifar.load_folder(folder, 32, workers=2)
    err = capsys.readouterr().err
    assert images.shape == (10, 3, 32, 32)
    for name in ("truncated.png", "dir.png", "._0.png"):
        assert sum(name in line and "warning: skipping" in line for line in err.splitlines()) == 1


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    """A 16-bit grayscale PNG of value v decodes to round(v / 257), not to a saturated 255."""
    from PIL import Image

    values = np.array([[0, 257 * 40], [257 * 128, 65535]], dtype=np.uint16).repeat(16, 0).repeat(16, 1)
    Image.fromarray(values).save(tmp_path / "deep.png")
    x = train_cifar.decode_image(tmp_path / "deep.png", 32)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert [int(x[0, 0, 0]), int(x[0, 0, 31]), int(x[0, 31, 0]), int(x[0, 31, 31])] == [0, 40, 128, 255]


def test_generate_prints_the_path_it_wrote_and_checks_the_folder_first(tmp_path, capsys, monkeypatch):
    """--out without .npz writes and prints OUT.npz; a missing folder fails (status 2) before any sampling."""
    out = _run(tmp_path, "--iters", "1")
    generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--num", "3", "--out", str(tmp_path / "s")])
    assert capsys.readouterr().out.strip().endswith(f"to {tmp_path / 's.npz'}")
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 1)
    monkeypatch.setattr(generate, "load_generator", lambda *a, **k: pytest.fail("sampled before checking --out"))
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "no" / "s.npz")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_generate_refuses_a_checkpoint_without_a_usable_config(tmp_path):
    """A checkpoint whose config lacks the network settings gives one line naming the file."""
    out = _run(tmp_path, "--iters", "1")
    state = _state(out)
    del state["config"]["arch"]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*checkpoint.pt.*: its config has no arch") as e:
        generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.npz")])
    _one_line_exit(e)
