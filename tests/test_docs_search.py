"""Search-result snippets show math as text: docs/_static/search-math.js turns every formula of the docs
(pages and docstrings) into plain text with no TeX left. Runs the script under node; skipped without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "_static" / "search-math.js"
NODE = shutil.which("node") or shutil.which("nodejs")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def formulas() -> list[str]:
    """Every formula of the Markdown pages ($...$, $$...$$) and of the docstrings (:math:, .. math::)."""
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not in code blocks
        out += re.findall(r"\$\$(.+?)\$\$", text, flags=re.S)
        out += re.findall(r"(?<![\$\\])\$([^\$\n]+?)\$", re.sub(r"\$\$.+?\$\$", "", text, flags=re.S))
    for source in sorted((ROOT / "gradpen").glob("*.py")):
        text = source.read_text().replace("\\\\", "\\")
        out += re.findall(r":math:`([^`]+)`", text)
        out += [m.strip() for m in re.findall(r"\.\. math::\n((?:\s*\n| {8,}.*\n)+)", text)]
    return out


def to_text(tex: list[str]) -> list[str]:
    run = f"const {{texToText}} = require({json.dumps(str(SCRIPT))});"
    run += "const xs = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
    run += "process.stdout.write(JSON.stringify(xs.map(texToText)));"
    done = subprocess.run([NODE, "-e", run], input=json.dumps(tex), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_known_readings():
    """The commands that showed as TeX in snippets read as text."""
    cases = {
        r"\(\varepsilon_k \sim \mathcal N(0, I)\)": "ε_k ~ N(0, I)",
        r"\(\frac1K \sum_k q_k^2\)": "1/K Σ_k q_k²",
        r'\texttt{"forward"}': '"forward"',
        r"\textstyle \frac{1}{2}\lVert g \rVert^2": "1/2‖ g ‖²",
        r"\Gamma(\tfrac{K+1}{2})/\Gamma(\tfrac K2)": "Γ((K+1)/2)/Γ(K/2)",
        r"\hat R_1(s)": "R̂_1(s)",
    }
    assert to_text(list(cases)) == list(cases.values())


def test_every_formula_reads_as_text():
    """No backslash command or brace survives in the text of any formula of the docs."""
    tex = formulas()
    assert len(tex) > 300  # the collection works
    left = [(t, s) for t, s in zip(tex, to_text(tex), strict=True) if re.search(r"\\[A-Za-z]|[{}]", s)]
    assert not left, "\n".join(f"{t!r} -> {s!r}" for t, s in left[:20])
