"""The docs and the README speak of the library, not of how it was made.

A measurement says what ran, on what hardware, under what load and with which command. Tracker issue
numbers, testers, commit hashes, "this project's machine", other people's jobs and the history of the
code ("gradpen now ...", "before this guard") belong in the changelog and the tracker, not on the site.
PyTorch's own issues may be named, as links to them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.joinpath("docs").glob("*.md"), *ROOT.joinpath("docs").glob("*.rst"), ROOT / "README.md"])

# A PyTorch issue, linked: the one kind of issue number the pages may carry.
PYTORCH_ISSUE_LINK = re.compile(r"\[[^\]]*\]\(https://github\.com/pytorch/pytorch/issues/\d+\)")

FORBIDDEN = {
    "an issue number (link PyTorch's as [PyTorch issue N](https://github.com/pytorch/pytorch/issues/N))": (
        r"\bissues?\s*#?\d+|(?<![\w/&])#\d+\b"
    ),
    "a tester": r"\btesters?\b",
    "a commit": r"\bcommit\b|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b",
    "the project's machines": (
        r"\bthis project\b|\bthis machine\b|\b(?:the|a) (?:quiet|shared) machine\b|developer machines"
        r"|where gradpen is developed|\bfor this (?:release|work)\b"
    ),
    "other people's jobs": r"\bother (?:engineers|jobs)\b|\bCI job\b|\bshared (?:it|the machine|with)\b",
    "the code's history": (
        r"\bbefore this guard\b|\bgradpen now\b|\bscratch measurement\b|\bwe (?:re-?measured|could not)\b"
    ),
    "what could not be done here": r"could not be consulted|\bno GPU was available\b",
}


def offences(text: str) -> list[str]:
    text = PYTORCH_ISSUE_LINK.sub("", text)
    found = []
    for what, pattern in FORBIDDEN.items():
        pattern = pattern.replace(" ", r"\s+")  # a phrase may be wrapped over two lines
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {m.group(0)!r} ({what})")
    return found


def test_patterns_catch_the_known_cases():
    """Each pattern finds a sentence of the kind it is for, and leaves a linked PyTorch issue alone."""
    bad = [
        "as quoted in issue 13",
        "A tester measured 5x",
        "The clone was at commit 7ff9693",
        "on this project's 2-core machine",
        "on this\nproject's CPU",
        "while other engineers' jobs shared the machine",
        "this run shared the machine with a CI job",
        "measured before this guard",
        "gradpen now runs the forward",
        "the paper could not be consulted from this machine",
        "pytorch/pytorch issue 116350",
    ]
    for sentence in bad:
        assert offences(sentence), sentence
    ok = [
        "[PyTorch issue 172543](https://github.com/pytorch/pytorch/issues/172543)",
        "2-core x86_64 CPU, load average 4 to 6, torch 2.14.1",
        "the critic's own `torch.Generator`; 4 graphs for 12 calls",
        "`examples/train_cifar.py --dataset digits`",
    ]
    for sentence in ok:
        assert not offences(sentence), sentence


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_speaks_of_the_library(path):
    """No tracker issue numbers, testers, commits, project machines, other jobs or code history on the page."""
    found = offences(path.read_text())
    assert not found, f"{path.relative_to(ROOT)}:\n" + "\n".join(found)


def test_readme_benchmark_table_is_the_results_file():
    """The README quotes ``benchmarks/results_cpu.md`` (the Benchmarks page includes it): its provenance
    lines and its rows, unchanged, so a re-run that updates the file cannot leave the README behind."""
    results = ROOT.joinpath("benchmarks", "results_cpu.md").read_text().strip()
    readme = ROOT.joinpath("README.md").read_text()
    assert results.splitlines()[0].startswith("Measured on")
    assert results in readme, "README.md's Benchmarks table differs from benchmarks/results_cpu.md"
