"""The API page documents every public name: each entry of ``gradpen.__all__`` has an autodoc directive."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gradpen

API = Path(__file__).resolve().parents[1] / "docs" / "api.rst"
DIRECTIVE = re.compile(r"^\.\. auto(?:function|class|exception|data|attribute|method)::\s+(?:gradpen\.)?(\w+)", re.M)


def documented() -> set[str]:
    return set(DIRECTIVE.findall(API.read_text()))


def test_api_page_has_directives():
    """The directive pattern finds the API page's entries (guards the comparison below against going empty)."""
    assert {"gradient_penalty", "GradientPenalty"} <= documented()


@pytest.mark.parametrize("name", sorted(gradpen.__all__))
def test_public_name_is_on_the_api_page(name):
    """A name in ``__all__`` appears in docs/api.rst as ``.. autofunction::``/``autoclass``/... directive."""
    assert name in documented(), f"gradpen.{name} is public (in __all__) but has no autodoc entry in docs/api.rst"
