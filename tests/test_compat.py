"""gradpen._compat: the torch floor and the features that need a newer torch fail with a message that names
the feature, the torch release it needs and the one found."""

from __future__ import annotations

import pytest
import torch

from gradpen import _compat


@pytest.mark.parametrize(
    ("version", "release"), [("2.6.0+cu124", (2, 6)), ("2.15.0", (2, 15)), ("2.10.0a0+git", (2, 10))]
)
def test_release_parses_torch_versions(version, release):
    assert _compat._release(version) == release


def test_require_names_the_feature_and_both_versions(monkeypatch):
    monkeypatch.setattr(_compat, "TORCH", (2, 5))
    match = r"the frobnicator needs torch>=2\.9, but this is torch "
    with pytest.raises(_compat.TorchTooOldError, match=match) as info:
        _compat.require("the frobnicator", (2, 9))
    assert torch.__version__ in str(info.value)
    _compat.require("the frobnicator", (2, 5))  # at the release itself: nothing


def test_below_the_floor_import_fails_with_one_clear_error(monkeypatch):
    monkeypatch.setattr(_compat, "TORCH", (2, 1))
    with pytest.raises(ImportError, match=r"gradpen needs torch>=\d+\.\d+, but this is torch "):
        _compat.check_floor()


def test_at_or_above_the_compile_region_the_entry_points_are_not_wrapped(monkeypatch):
    monkeypatch.setattr(_compat, "TORCH", _compat.COMPILE_REGION)
    f = lambda x: x
    assert _compat.eager_below_compile_region(f) is f
    monkeypatch.setattr(_compat, "TORCH", (2, 6))

    def penalty(x):
        """doc"""
        return x

    wrapped = _compat.eager_below_compile_region(penalty)
    assert wrapped is not penalty and wrapped.__name__ == "penalty" and wrapped.__doc__ == "doc"
    assert wrapped(3) == 3
