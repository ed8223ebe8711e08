"""examples/digits_score.py, the offline digits scorer the README's numbers come from: it must accept held-out
real digits and reject non-digits, or its "recognisable" share means nothing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")
import digits_score  # tests/conftest.py puts examples/ on sys.path


def test_scorer_accepts_real_digits_and_rejects_non_digits():
    """Held-out real digits: >= 90% recognisable at p >= 0.9 and >= 95% accuracy; shuffled pixels, noise and
    two-class blends made from held-out digits: <= 5% recognisable each."""
    out = digits_score.check()
    assert out["real_recognisable"] >= 0.9 and out["real_accuracy"] >= 0.95, out
    for kind in ("shuffled", "noise", "blends"):
        assert out[f"{kind}_recognisable"] <= 0.05, (kind, out)


def test_score_of_real_digits_equals_the_real_reference():
    """score() of the held-out real digits themselves (as [-1, 1] images) gives the real_* numbers it reports
    beside them, and a Frechet distance of 0 to itself."""
    _, (xte, _) = digits_score._split()
    images = xte.view(-1, 1, 8, 8) * 2 - 1
    out = digits_score.score(images)
    for key in ("recognisable", "min_class_share", "digits_is"):
        assert out[key] == pytest.approx(out[f"real_{key}"], abs=1e-6), key
    assert abs(out["fd"]) < 1e-6


def test_blank_and_constant_images_are_not_digits():
    """All-black, all-white and mid-grey images are never recognisable digits (scored under no_grad)."""
    digits_score.train_classifier.cache_clear()
    with torch.no_grad():  # the classifier trains on first use, also under no_grad
        for value in (-1.0, 0.0, 1.0):
            out = digits_score.score(torch.full((50, 1, 8, 8), value))
            assert out["recognisable"] == 0.0, value


@pytest.mark.parametrize("num", ["0", "1"])
def test_too_few_samples_exit_2_with_one_line_naming_num(num, capsys, monkeypatch):
    """--num 0 or 1 exits 2 with one line naming --num and its minimum of 2, before any checkpoint is read."""
    import generate

    monkeypatch.setattr(generate, "load_generator", lambda *a, **k: pytest.fail("read the checkpoint before --num"))
    with pytest.raises(SystemExit) as e:
        digits_score.main(["checkpoint.pt", "--num", num])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"--num must be >= 2 (the Frechet distance needs a covariance of the samples), got {num}" in err


def test_score_of_one_sample_is_an_error_not_a_hang(monkeypatch):
    """score() of a single image raises ValueError naming the minimum before sqrtm sees a NaN covariance."""
    monkeypatch.setattr(digits_score.linalg, "sqrtm", lambda *a, **k: pytest.fail("sqrtm of a 1-sample covariance"))
    with pytest.raises(ValueError, match=r"must hold >= 2 samples .*covariance.*; got 1"):
        digits_score.score(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("shape", [(20, 3, 8, 8), (20, 1, 4, 4), (20, 1, 8, 16), (20, 64)])
def test_score_refuses_images_it_cannot_score(shape):
    """score() of RGB, smaller than 8x8, non-square or flat images raises ValueError echoing the shape."""
    with pytest.raises(ValueError, match=r"1-channel square images .*got shape " + rf"\({', '.join(map(str, shape))}"):
        digits_score.score(torch.zeros(shape))


def test_rgb_checkpoint_exits_2_with_one_line_naming_it(tmp_path, capsys):
    """A checkpoint of 3-channel images exits 2 with one line naming the file and its channels, no traceback."""
    import models

    gen, _ = models.build("mlp", 8, 8, 3)
    ck = {"config": {"arch": "mlp", "dim": 8, "image_size": 8}, "generator": gen.state_dict(), "critic": {},
          "ema": None, "channels": 3, "iter": 0}  # fmt: skip
    torch.save(ck, tmp_path / "rgb.pt")
    with pytest.raises(SystemExit) as e:
        digits_score.main([str(tmp_path / "rgb.pt"), "--num", "20"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"checkpoint {str(tmp_path / 'rgb.pt')!r} makes 3-channel 8x8 images" in err
