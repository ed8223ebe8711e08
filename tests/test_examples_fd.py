"""examples/train_cifar.py --backend fd: exact penalties with no double backward, under FSDP2 too.

The 2-process runs go through torchrun (1 thread each); the others call main() in this process. Runs stop
with --stop-at before --iters, so none trains the digits scorer.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import train_cifar

import gradpen
from tests._examples import assert_same_tensors, checkpoint_state, run_digits, torchrun_digits, train_lines

pytestmark = pytest.mark.slow
VIT = ["--critic", "vit", "--sample-every", "100"]
FD = ["--critic", "vit", "--penalty", "wgan-gp", "--backend", "fd", "--gp-every", "2", "--ckpt-every", "2",
      "--iters", "5"]  # fmt: skip
STATE_KEYS = ["generator", "critic", "ema", "opt_g", "opt_d", "sched_g", "sched_d", "penalty", "rng", "batches", "log"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("train_cifar.py: error:")]


@pytest.fixture(scope="module")
def fsdp_fd_run(tmp_path_factory):
    """One uninterrupted 4-step `--fsdp --penalty wgan-gp --backend fd` run on 2 processes."""
    tmp = tmp_path_factory.mktemp("fsdp_fd")
    proc = _ok(torchrun_digits(tmp, *FD, "--fsdp", "--stop-at", "4", "--ema", "0.9", out="full"))
    return tmp / "full", proc


def test_fsdp_fd_wgan_gp_resumes_bit_for_bit_and_equals_ddp(fsdp_fd_run, tmp_path):
    """WGAN-GP through FSDP2 with --backend fd, 2 gloo processes: 0->2 then --resume 2->4 ends with the state and
    log of the run 0->4, and the same flags under DDP (no --fsdp) reach bit-identical weights and log."""
    full, proc = fsdp_fd_run
    assert "the critic is sharded (FSDP)" in proc.stdout
    _ok(torchrun_digits(tmp_path, *FD, "--fsdp", "--ema", "0.9", "--stop-at", "2", out="part"))
    assert (
        "resumed from" in _ok(torchrun_digits(tmp_path, *FD, "--fsdp", "--stop-at", "4", "--resume", out="part")).stdout
    )
    a, b = checkpoint_state(full), checkpoint_state(tmp_path / "part")
    for key in STATE_KEYS:
        assert_same_tensors(a[key], b[key], key)
    assert train_lines(full) == train_lines(tmp_path / "part") and len(train_lines(full)) == 4
    assert a["config"]["backend"] == "fd" and a["config"]["fsdp"]
    _ok(torchrun_digits(tmp_path, *FD, "--stop-at", "4", "--ema", "0.9", out="ddp"))
    c = checkpoint_state(tmp_path / "ddp")
    for key in ["generator", "critic", "ema"]:
        assert_same_tensors(a[key], c[key], key)
    assert train_lines(full) == train_lines(tmp_path / "ddp")


def test_fsdp_with_an_exact_backend_names_backend_fd_first(tmp_path):
    """--fsdp with the autograd backend stops before any step with one line from rank 0 that names --backend fd
    first, then the other ways out."""
    proc = torchrun_digits(tmp_path, "--critic", "vit", "--fsdp", "--penalty", "wgan-gp", "--iters", "2")
    assert proc.returncode != 0
    (line,) = _errors(proc)
    assert "--penalty wgan-gp --backend autograd --fsdp: An exact gradient penalty cannot run through FSDP" in line
    here = line[line.index("In this trainer:") :]
    assert here.index("--backend fd") < here.index("--penalty approx-r1") < here.index("no --fsdp")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_fsdp_fd_on_one_process_equals_the_unsharded_fd_run(tmp_path):
    """--fsdp --backend fd without torchrun (a 1-process group) trains bit-identically to the unsharded fd run."""
    common = [*FD, "--stop-at", "2", "--sample-every", "100"]
    a = checkpoint_state(run_digits(tmp_path, *common, "--fsdp", out="fsdp"))
    b = checkpoint_state(run_digits(tmp_path, *common, out="plain"))
    for key in ["generator", "critic", "ema", "rng"]:
        assert_same_tensors(a[key], b[key], key)
    assert not dist.is_initialized()


def test_fd_wgan_gp_logs_the_penalty_recomputed_from_the_same_batch(tmp_path, monkeypatch):
    """Each WGAN-GP penalty the loop adds with --backend fd equals gradpen.gradient_penalty(backend='fd')
    recomputed from the same critic, batch and RNG state, and is the exact penalty's value."""
    calls = []

    class Recording(gradpen.GradientPenalty):
        def forward(self, critic, real, fake, **kwargs):
            state = (copy.deepcopy(train_cifar.unwrap(critic)), real.clone(), fake.clone(), torch.get_rng_state())
            out = super().forward(critic, real, fake, **kwargs)
            calls.append((*state, out.detach(), self.last_norms.clone()))
            return out

    monkeypatch.setattr(train_cifar.gradpen, "GradientPenalty", Recording)
    out = run_digits(tmp_path, *VIT, "--penalty", "wgan-gp", "--backend", "fd", "--gp-weight", "5", "--iters", "2")
    assert len(calls) == 4  # 2 generator steps x 2 critic steps
    for critic, real, fake, rng, applied, norms in calls:
        torch.set_rng_state(rng)
        fd, fd_norms = gradpen.gradient_penalty(critic, real, fake, backend="fd", return_norms=True)
        torch.set_rng_state(rng)
        exact = gradpen.gradient_penalty(critic, real, fake)
        torch.testing.assert_close(applied, 5.0 * fd, rtol=1e-6, atol=0)
        torch.testing.assert_close(norms, fd_norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(fd, exact, rtol=1e-5, atol=1e-7)
    lines = train_lines(out)
    assert [r["gp"] for r in lines] == pytest.approx(
        [(float(calls[i][4]) + float(calls[i + 1][4])) / 2 for i in (0, 2)]
    )


def test_fd_r1_comes_from_the_loss_forward(tmp_path, monkeypatch):
    """--penalty r1 --backend fd takes R1 from the loss's own forward (gradient_norms_from with the critic), not a
    second forward of the real batch: the logged gp is gp_weight * the exact R1 of the same critic and batch."""
    calls = []
    norms_from = gradpen.gradient_norms_from

    def recording(outputs, inputs, **kwargs):
        calls.append((copy.deepcopy(train_cifar.unwrap(kwargs["critic"])), inputs.detach().clone(), kwargs))
        return norms_from(outputs, inputs, **kwargs)

    monkeypatch.setattr(train_cifar.gradpen, "gradient_norms_from", recording)
    out = run_digits(tmp_path, *VIT, "--penalty", "r1", "--loss", "logistic", "--backend", "fd", "--gp-weight", "5",
                     "--iters", "2", "--n-critic", "1")  # fmt: skip
    assert len(calls) == 2 and all(kw["backend"] == "fd" for _, _, kw in calls)
    for (critic, real, _), line in zip(calls, train_lines(out), strict=True):
        r1 = gradpen.r1_penalty(critic, real)
        assert line["gp"] == pytest.approx(5.0 * r1.item(), rel=1e-5)
        assert line["grad_norm"] == pytest.approx(gradpen.gradient_norms(critic, real).mean().item(), rel=1e-5)
    assert checkpoint_state(out)["config"]["backend"] == "fd"


def test_kinked_critic_with_fd_is_refused_at_startup(tmp_path, capsys):
    """--arch dcgan (LeakyReLU) with --backend fd stops before any step with the library's refusal in one line,
    naming the layer and --critic vit."""
    with pytest.raises(SystemExit) as e:
        run_digits(tmp_path, "--arch", "dcgan", "--backend", "fd", "--iters", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "piecewise-linear" in err and "LeakyReLU" in err and "--critic vit" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_with_another_backend_is_refused(tmp_path, capsys):
    """The checkpoint records --backend: resuming an fd run with --backend autograd exits 2 naming both values."""
    run_digits(tmp_path, *FD, "--stop-at", "1", "--sample-every", "100")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_digits(tmp_path, *FD, "--backend", "autograd", "--resume")
    assert e.value.code == 2 and "--backend autograd (checkpoint: fd)" in capsys.readouterr().err


def test_bf16_approx_sigma_below_resolution_is_refused_at_startup(tmp_path, capsys):
    """--amp bf16 --penalty approx-r1 --approx-sigma 0.01 (a few bf16 ulps at the images' scale) stops before any
    step, in one line naming the flag's way out; --approx-sigma 0.1 runs."""
    with pytest.raises(SystemExit) as e:
        run_digits(tmp_path, *VIT, "--amp", "bf16", "--penalty", "approx-r1", "--approx-sigma", "0.01", "--iters", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resolution of bfloat16" in err and "a larger --approx-sigma" in err
