"""The docs' code blocks fit the page: no line longer than the column shows at 1280 px without clipping."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MAX = 88  # characters of the code font in furo's content column at 1280 px wide
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every fenced code block; MyST directives (```{note}) are not code."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m["fence"], m["info"].strip(), i + 1
        end = start
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if not info.startswith("{") or info.startswith(("{code-block}", "{code}")):
            blocks.append((start + 1, lines[start:end]))
        i = end + 1
    return blocks


def test_code_blocks_are_found():
    """The fence parser finds the blocks (guards the check below against passing on nothing)."""
    text = "a\n```python\nx = 1\n```\n```{note}\ntext\n```\n~~~bash\necho\n~~~\n"
    assert [b for _, b in code_blocks(text)] == [["x = 1"], ["echo"]]
    assert sum(len(code_blocks(p.read_text())) for p in PAGES) > 30


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_lines_fit_the_column(page):
    """Every line of every code block on the page has at most MAX characters."""
    long = [
        f"line {first + k}: {len(line)} chars: {line.strip()[:60]}"
        for first, block in code_blocks(page.read_text())
        for k, line in enumerate(block)
        if len(line) > MAX
    ]
    assert not long, f"{page.name}: code lines over {MAX} characters:\n" + "\n".join(long)
