"""Sphinx configuration for gradpen: name and version come from the package."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradpen  # noqa: E402

project = "gradpen"
author = "The gradpen developers"
copyright = "2026, The gradpen developers"
release = gradpen.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "myst_parser",
    "sphinx_copybutton",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = [
    "dollarmath",
    "amsmath",
    "colon_fence",
    "deflist",
]  # deflist: the Tutorial's argument list
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings carry the types, in the PyTorch style
# A signature longer than a code line shows one parameter per line, so it never breaks inside a default.
python_maximum_signature_line_length = 88
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_preprocess_types = True
napoleon_type_aliases = {
    "Tensor": "torch.Tensor",
    "Tensors": "torch.Tensor",
    "Callable": "collections.abc.Callable",
    "sequence": "collections.abc.Sequence",
    "torch.Generator": "torch.Generator",
    "torch.amp.GradScaler": "torch.amp.GradScaler",
}
napoleon_custom_sections = [("Shape", "params_style")]

# Each project's full inventory online; offline (CI here has no internet) a small local inventory of
# the objects these docs reference, built by _inv/make_inventories.py.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, "_inv/python.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable", (None, "_inv/torch.inv")),
    "numpy": ("https://numpy.org/doc/stable", (None, "_inv/numpy.inv")),
}
intersphinx_timeout = 5

copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

html_theme = "furo"
html_title = f"gradpen {release}"
html_favicon = "_static/favicon.svg"  # a nabla
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # wide equations and tables stay inside the page
html_js_files = ["search-math.js"]  # search snippets show math as text, not TeX source
# MathJax 3.2.2 (SVG output, self-contained, Apache-2.0) ships with the docs, so the math renders
# without a CDN: offline, and in CI's screenshots.
mathjax_path = "mathjax/tex-svg.js"

# The benchmarks page shows benchmarks/results_cpu.md (written by benchmarks/bench_penalty.py) as one
# table per critic: the critic names its table instead of filling a column of every row, so the
# tables fit a phone. The page holds the marker where they go.
RESULTS_CPU = ROOT / "benchmarks" / "results_cpu.md"
RESULTS_MARKER = "<!-- benchmarks/results_cpu.md, one table per critic -->"


def results_tables(text: str) -> str:
    """The file's "Measured on ..." line, then its table split by the first column."""
    lines = text.splitlines()
    measured = [line for line in lines if line.startswith("Measured on")]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in lines
        if line.startswith("|")
    ]
    header, body = rows[0], [r for r in rows[2:] if r and not set(r[0]) <= set("-:")]
    keep = [
        i for i in range(1, len(header)) if any(r[i] not in ("n/a", "") for r in body)
    ]  # no all-n/a column
    out = measured[:1]
    for critic in dict.fromkeys(r[0] for r in body):
        out += [
            "",
            f"**{critic}**",
            "",
            "| " + " | ".join(header[i] for i in keep) + " |",
        ]
        out += ["|---|" + "---:|" * (len(keep) - 1)]
        out += [
            "| " + " | ".join(r[i] for i in keep) + " |" for r in body if r[0] == critic
        ]
    return "\n".join(out) + "\n"


def _insert_results(app, docname, source):
    if RESULTS_MARKER in source[0]:
        app.env.note_dependency(str(RESULTS_CPU))
        source[0] = source[0].replace(
            RESULTS_MARKER, results_tables(RESULTS_CPU.read_text())
        )


def setup(app):
    app.connect("source-read", _insert_results)
