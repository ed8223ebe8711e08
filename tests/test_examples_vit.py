"""examples/train_cifar.py --critic vit and --penalty approx-r1: the penalties the loop applies, kernels, resume, flags.

Each run is a few tiny steps (dim 8, batch 8) on the bundled digits; the generator is the mlp one.
"""

from __future__ import annotations

import copy

import generate
import numpy as np
import pytest
import torch
import train_cifar
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradpen
from tests._examples import assert_same_tensors, checkpoint_state, run_digits, train_lines

pytestmark = pytest.mark.slow
VIT = ["--critic", "vit", "--sample-every", "100"]
STATE_KEYS = ["generator", "critic", "ema", "opt_g", "opt_d", "sched_g", "sched_d", "penalty", "rng", "batches", "log"]


@pytest.fixture
def sdpa_flags(monkeypatch):
    """Record, for every attention call of the ViT critic, whether the flash and MATH kernels were enabled."""
    calls = []
    sdpa = train_cifar.models.F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(train_cifar.models.F, "scaled_dot_product_attention", recording)
    return calls


def _reference_exact(kind, critic, real, fake, weight):
    """The hand-written recipe (autograd.grad with create_graph) on the MATH kernel: weight * penalty."""
    x = gradpen.interpolate(real, fake) if kind == "wgan-gp" else real  # alpha from the global RNG, as gradpen draws it
    x = x.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    norms = g.flatten(1).norm(dim=1)
    return weight * ((norms - 1).square() if kind == "wgan-gp" else norms.square()).mean()


@pytest.mark.parametrize("kind", ["wgan-gp", "r1"])
def test_vit_exact_penalties_equal_a_math_kernel_reference(tmp_path, monkeypatch, sdpa_flags, kind):
    """Every penalty the loop adds equals the hand-written recipe on the MATH kernel; its forwards ran on MATH only."""
    calls = []

    class Recording(gradpen.GradientPenalty):
        def forward(self, critic, real, fake, **kwargs):
            seen = len(sdpa_flags)
            state = (copy.deepcopy(train_cifar.unwrap(critic)), real.clone(), fake.clone(), torch.get_rng_state())
            out = super().forward(critic, real, fake, **kwargs)
            calls.append((*state, out.detach(), sdpa_flags[seen:]))
            return out

    monkeypatch.setattr(train_cifar.gradpen, "GradientPenalty", Recording)
    out = run_digits(tmp_path, *VIT, "--penalty", kind, "--gp-weight", "5", "--iters", "2")
    assert len(calls) == 4  # 2 generator steps x 2 critic steps
    for critic, real, fake, rng, applied, flags in calls:
        torch.set_rng_state(rng)
        torch.testing.assert_close(applied, _reference_exact(kind, critic, real, fake, 5.0), rtol=1e-5, atol=1e-7)
        assert flags and set(flags) == {(False, True)}  # flash off, MATH on, in every forward of the penalty
    assert any(f == (True, True) for f in sdpa_flags)  # the loss's own forward keeps the default kernels
    logged = [r["gp"] for r in train_lines(out)]
    assert logged == pytest.approx([np.mean([float(c[4]) for c in calls[i : i + 2]]) for i in (0, 2)], rel=1e-6)


def test_vit_approx_r1_logged_gp_is_the_estimator_recomputed_on_the_same_batch(tmp_path, monkeypatch, sdpa_flags):
    """With --gp-every 2, each log line's gp is gp_weight * approx_r1_penalty recomputed from the same critic,
    batch and RNG state (lazy: 2x on one call of two), grad_norm its mean estimated norm; default kernels."""
    calls = []
    estimator = gradpen.approx_r1_penalty

    def recording(critic, real, **kwargs):
        seen = len(sdpa_flags)
        state = (copy.deepcopy(critic), real.clone(), torch.get_rng_state(), kwargs)
        out = estimator(critic, real, **kwargs)
        calls.append((*state, sdpa_flags[seen:]))
        return out

    monkeypatch.setattr(train_cifar.gradpen, "approx_r1_penalty", recording)
    argv = [
        "--penalty",
        "approx-r1",
        "--gp-weight",
        "5",
        "--gp-every",
        "2",
        "--approx-sigma",
        "0.05",
        "--approx-draws",
        "3",
    ]
    out = run_digits(tmp_path, *VIT, *argv, "--iters", "3")
    assert len(calls) == 4  # the start-up check (its value unused), then 6 critic steps, every other one computes it
    calls = calls[1:]
    lines = train_lines(out)
    for (critic, real, rng, kwargs, flags), line in zip(calls, lines, strict=True):
        assert kwargs == {"sigma": 0.05, "draws": 3, "return_norms": True}
        torch.set_rng_state(rng)
        est = estimator(critic, real, sigma=0.05, draws=3, reduction="none")  # the unpatched function
        assert line["gp"] == pytest.approx(5.0 * est.mean().item(), rel=1e-6)  # (2 * 5 * est + 0) / 2 critic steps
        assert line["grad_norm"] == pytest.approx(est.sqrt().mean().item(), rel=1e-6)
        assert flags and set(flags) == {(True, True)}  # no kernel forced: the estimator runs on the defaults
    assert checkpoint_state(out)["penalty"]["_extra_state"] == {"calls": 6}


def test_approx_r1_resume_is_bit_for_bit(tmp_path):
    """Stopping at step 2 and resuming a lazy approx-r1 ViT run ends with the same state and log as one run."""
    common = [*VIT, "--penalty", "approx-r1", "--gp-every", "3", "--iters", "4", "--ckpt-every", "2", "--ema", "0.9"]
    full = run_digits(tmp_path, *common, out="full")
    part = run_digits(tmp_path, *common, "--stop-at", "2", out="part")
    run_digits(tmp_path, *common, "--resume", out="part")
    a, b = checkpoint_state(full), checkpoint_state(part)
    for key in STATE_KEYS:
        assert_same_tensors(a[key], b[key], key)
    assert train_lines(full) == train_lines(part)
    assert a["config"]["critic"] == "vit" and a["config"]["penalty"] == "approx-r1"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_approx_r1_trains_under_autocast(tmp_path, amp):
    """Under bf16/fp16 autocast the approx-r1 ViT run logs finite losses and positive penalties."""
    out = run_digits(tmp_path, *VIT, "--penalty", "approx-r1", "--amp", amp, "--iters", "2", "--approx-sigma", "0.1")
    for line in train_lines(out):
        assert np.isfinite([line["loss_d"], line["loss_g"], line["gp"]]).all() and line["gp"] > 0


@pytest.mark.parametrize("penalty", ["approx-r1", "wgan-gp"])
def test_compiled_step_equals_eager(tmp_path, penalty):
    """--compile computes the eager step: one critic step and one generator step give the eager run's logged
    values up to the rounding of inductor's kernels.

    Only the first step is compared. Compiled kernels round differently from eager ones (1e-7 relative here),
    and training amplifies that: Adam's first updates are about lr * sign(grad), so a rounding-sized change of a
    near-zero gradient entry moves its weight by up to 2 lr, and the finite-difference estimator divides
    rounding by sigma. Over ten critic steps the two runs drift apart by 1e-4 to 1e-2 depending on the CPU's
    vector instructions, which says nothing about what --compile computes.
    """
    common = ["--penalty", penalty, "--n-critic", "1", "--iters", "1", "--sample-every", "100"]
    (eager,) = train_lines(run_digits(tmp_path, *common, out="eager"))
    (compiled,) = train_lines(run_digits(tmp_path, *common, "--compile", out="compiled"))
    for key in ("loss_d", "wasserstein", "gp", "grad_norm"):  # the first critic step: before any update
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-7), key
    assert compiled["loss_g"] == pytest.approx(eager["loss_g"], rel=1e-4)  # after one critic update


def test_resume_with_another_critic_or_sigma_is_refused_and_generate_loads_vit_checkpoints(tmp_path, capsys):
    """The checkpoint records --critic and --approx-sigma: a resume that changes them exits 2 naming both;
    generate.py samples from a ViT-critic checkpoint."""
    out = run_digits(tmp_path, *VIT, "--penalty", "approx-r1", "--iters", "3", "--stop-at", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_digits(tmp_path, "--critic", "arch", "--approx-sigma", "0.1", "--iters", "3", "--resume")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--critic arch (checkpoint: vit)" in err and "--approx-sigma 0.1 (checkpoint: 0.01)" in err
    generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--num", "4", "--out", str(tmp_path / "s.npz")])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 8, 8, 1)


def test_checkpoint_without_the_new_flags_resumes_with_their_defaults(tmp_path):
    """A checkpoint written before --critic/--fsdp/--approx-* existed resumes as --critic arch, no FSDP."""
    out = run_digits(tmp_path, "--iters", "2", "--stop-at", "1", "--sample-every", "100")
    ck = checkpoint_state(out)
    for name in train_cifar.ADDED_FLAGS:
        del ck["config"][name]
    torch.save(ck, out / "checkpoint.pt")
    run_digits(tmp_path, "--iters", "2", "--resume")
    assert checkpoint_state(out)["config"]["critic"] == "arch" and checkpoint_state(out)["iter"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--penalty", "approx-r1", "--approx-sigma", "0"], "--approx-sigma must be > 0, got 0.0"),
        (["--penalty", "approx-r1", "--approx-sigma=-1"], "--approx-sigma must be > 0, got -1.0"),
        (["--penalty", "approx-r1", "--approx-sigma", "nan"], "--approx-sigma must be a finite number, got nan"),
        (["--penalty", "approx-r1", "--approx-sigma", "inf"], "--approx-sigma must be a finite number, got inf"),
        (["--penalty", "approx-r1", "--approx-draws", "0"], "--approx-draws must be >= 1, got 0"),
        (["--penalty", "approx-r1", "--backend", "func"], "--backend does not apply to --penalty approx-r1"),
        (["--penalty", "approx-r1", "--one-sided"], "--center/--one-sided do not apply to --penalty approx-r1"),
        (["--approx-sigma", "0.1"], "--approx-sigma/--approx-draws apply to --penalty approx-r1, not wgan-gp"),
        (["--critic", "vit", "--dim", "6"], "--dim must be a multiple of 4 (attention heads) for --critic vit, got 6"),
        (["--critic", "cnn"], "argument --critic: invalid choice: 'cnn'"),
    ],
)
def test_bad_vit_and_approx_flags_give_one_line_naming_the_flag(argv, message, capsys):
    """Bad --approx-*/--critic values and combinations exit with status 2 and one line naming the flag."""
    with pytest.raises(SystemExit) as exc:
        train_cifar.parse_args(["--dataset", "digits", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_logistic_loss_is_the_non_saturating_loss_plus_the_penalty(tmp_path, monkeypatch):
    """--loss logistic: each logged loss_d is softplus(D(fake)) + softplus(-D(real)) (means) plus the R1 penalty
    applied, with D the critic before that step's update (one critic step per log line)."""
    calls = []

    class Recording(gradpen.GradientPenalty):
        def forward(self, critic, real, fake, **kwargs):
            calls.append((copy.deepcopy(train_cifar.unwrap(critic)), real.clone(), fake.clone()))
            return super().forward(critic, real, fake, **kwargs)

    monkeypatch.setattr(train_cifar.gradpen, "GradientPenalty", Recording)
    out = run_digits(tmp_path, "--loss", "logistic", "--penalty", "r1", "--gp-weight", "5", "--n-critic", "1",
                     "--iters", "3", "--sample-every", "100")  # fmt: skip
    lines = train_lines(out)
    assert len(calls) == len(lines) == 3
    for (critic, real, fake), line in zip(calls, lines, strict=True):
        scores = critic(torch.cat([real, fake])).float()
        d_real, d_fake = scores[: len(real)], scores[len(real) :]
        loss = torch.nn.functional.softplus(d_fake).mean() + torch.nn.functional.softplus(-d_real).mean()
        assert line["gp"] > 0
        assert line["loss_d"] == pytest.approx(loss.item() + line["gp"], rel=1e-5)
        assert line["wasserstein"] == pytest.approx((d_real.mean() - d_fake.mean()).item(), rel=1e-5)
