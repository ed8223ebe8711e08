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
