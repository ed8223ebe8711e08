"""Every ```python block of the docs runs, page by page, in one namespace per page (in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_docs_have_examples():
    """The pages that teach the API carry runnable examples (guards the glob below against going empty)."""
    names = {p.stem for p in PAGES}
    assert {"index", "tutorial", "choosing", "backends", "precision", "faq"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_page_examples_run(page, tmp_path, monkeypatch):
    """The page's python blocks execute top to bottom without error (their asserts check the claims)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
