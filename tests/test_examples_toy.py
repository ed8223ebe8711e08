"""examples/toy_2d.py: the metrics on inputs with known answers, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import toy_2d

import gradpen


@pytest.mark.parametrize("dataset", ["8gaussians", "25gaussians"])
def test_points_at_the_modes_are_all_high_quality_and_cover_every_mode(dataset):
    """Samples exactly at the centres: 100% high quality, every mode covered."""
    centres, std = toy_2d.modes(dataset)
    m = toy_2d.mode_metrics(np.repeat(centres, 3, axis=0), centres, std)
    assert m == {"high_quality": 1.0, "modes_covered": len(centres), "modes": len(centres)}


def test_all_in_one_mode_covers_one_mode():
    """Every sample near one centre covers exactly 1 mode; far points are not high quality."""
    centres, std = toy_2d.modes("8gaussians")
    rng = np.random.default_rng(0)
    near = centres[3] + rng.normal(size=(200, 2)) * std * 0.5
    far = np.full((50, 2), 5.0)
    m = toy_2d.mode_metrics(np.concatenate([near, far]), centres, std)
    assert m["modes_covered"] == 1
    assert m["high_quality"] == pytest.approx(200 / 250)


def test_w1_of_a_translated_copy_is_the_translation_length():
    """W1 between a point set and its translate by t equals |t| (the identity assignment is optimal)."""
    x = np.random.default_rng(1).normal(size=(300, 2))
    t = np.array([0.3, -0.4])
    assert toy_2d.w1(x, x + t) == pytest.approx(0.5, rel=1e-9)
    assert toy_2d.w1(x, x) == 0.0


def test_datasets_match_the_official_scaling():
    """8gaussians lie at radius 2/1.414 and 25gaussians on the 5x5 grid /2.828, as in gan_toy.py."""
    c8, s8 = toy_2d.modes("8gaussians")
    assert np.allclose(np.linalg.norm(c8, axis=1), 2 / 1.414)
    assert s8 == pytest.approx(0.02 / 1.414)
    c25, _ = toy_2d.modes("25gaussians")
    assert len(c25) == 25 and np.isclose(c25.max(), 4 / 2.828)
    roll = toy_2d.sample("swissroll", 1000, np.random.default_rng(0))
    assert roll.shape == (1000, 2) and np.abs(roll).max() < 2.5


@pytest.mark.slow
def test_tiny_run_writes_png_and_json(tmp_path):
    """A 3-iteration run of gp and clip on 8gaussians writes the figure and finite metrics."""
    toy_2d.main(["--dataset", "8gaussians", "--penalty", "gp,clip", "--iters", "3", "--out", str(tmp_path)])
    table = json.loads((tmp_path / "toy_metrics.json").read_text())
    assert [r["penalty"] for r in table] == ["gp", "clip"]
    assert all(np.isfinite(r["w1"]) and 0 <= r["modes_covered"] <= 8 for r in table)
    assert (tmp_path / "toy_8gaussians.png").stat().st_size > 10_000


@pytest.mark.slow
def test_gradnorms_figure(tmp_path):
    """--figure gradnorms writes one curve of 12 per-layer norms (one per hidden layer's activations) for each
    of the 4 settings, and shows the paper's Figure 1b effect: under clipping at c <= 0.01 the gradient
    vanishes towards the input by orders of magnitude, under the penalty it does not."""
    toy_2d.main(["--figure", "gradnorms", "--gradnorm-steps", "2", "--out", str(tmp_path)])
    curves = json.loads((tmp_path / "toy_gradnorms.json").read_text())
    assert len(curves) == 4 and all(len(v) == 12 for v in curves.values())
    for name, norms in curves.items():
        if name in ("weight clipping c=0.01", "weight clipping c=0.001"):
            assert norms[0] < 1e-3 * norms[-1], (name, norms)
        elif name == "gradient penalty":
            assert 0.1 < norms[0] / norms[-1] < 10, norms
    assert (tmp_path / "toy_gradnorms.png").exists()


@pytest.mark.slow
def test_fd_backend_with_silu_equals_the_exact_step_and_relu_is_refused(tmp_path, capsys):
    """--backend fd --activation silu runs and records both in the metrics; its first critic step's loss equals
    the autograd backend's (the exact value); --backend fd on the ReLU critic stops in one line naming the flag."""
    common = ["--dataset", "8gaussians", "--penalty", "gp", "--iters", "2", "--activation", "silu"]
    toy_2d.main([*common, "--backend", "fd", "--out", str(tmp_path / "fd")])
    (row,) = json.loads((tmp_path / "fd" / "toy_metrics.json").read_text())
    assert row["backend"] == "fd" and row["activation"] == "silu" and np.isfinite(row["w1"])
    torch.manual_seed(0)
    critic, real, fake = toy_2d.Critic(activation="silu"), torch.randn(256, 2), torch.randn(256, 2)
    alpha = torch.rand(256)
    exact = gradpen.gradient_penalty(critic, real, fake, alpha=alpha)
    fd = gradpen.gradient_penalty(critic, real, fake, alpha=alpha, backend="fd")
    torch.testing.assert_close(fd, exact, rtol=1e-6, atol=0)
    with pytest.raises(SystemExit) as e:
        toy_2d.main(["--dataset", "8gaussians", "--penalty", "gp", "--iters", "2", "--backend", "fd"])
    assert e.value.code == 2 and "--activation silu" in capsys.readouterr().err
