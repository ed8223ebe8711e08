"""Build the small offline intersphinx inventories in this folder.

The docs link to a handful of Python, PyTorch and NumPy objects. Online builds fetch the projects'
full ``objects.inv``; where that fails (offline CI), Sphinx falls back to these files, which map just
the objects we reference to their real URLs. Regenerate with ``python docs/_inv/make_inventories.py``.
"""

import zlib
from pathlib import Path

HERE = Path(__file__).parent

ENTRIES = {
    "python": [
        ("float", "py:class", "library/functions.html#float"),
        ("int", "py:class", "library/functions.html#int"),
        ("bool", "py:class", "library/functions.html#bool"),
        ("str", "py:class", "library/stdtypes.html#str"),
        ("tuple", "py:class", "library/stdtypes.html#tuple"),
        ("dict", "py:class", "library/stdtypes.html#dict"),
        ("callable", "py:function", "library/functions.html#callable"),
        (
            "collections.abc.Callable",
            "py:class",
            "library/collections.abc.html#collections.abc.Callable",
        ),
        (
            "collections.abc.Sequence",
            "py:class",
            "library/collections.abc.html#collections.abc.Sequence",
        ),
        ("UserWarning", "py:exception", "library/exceptions.html#UserWarning"),
        ("ValueError", "py:exception", "library/exceptions.html#ValueError"),
        ("TypeError", "py:exception", "library/exceptions.html#TypeError"),
    ],
    "torch": [
        ("torch.Tensor", "py:class", "tensors.html#torch.Tensor"),
        (
            "torch.Generator",
            "py:class",
            "generated/torch.Generator.html#torch.Generator",
        ),
        (
            "torch.nn.Module",
            "py:class",
            "generated/torch.nn.Module.html#torch.nn.Module",
        ),
        (
            "torch.nn.LayerNorm",
            "py:class",
            "generated/torch.nn.LayerNorm.html#torch.nn.LayerNorm",
        ),
        (
            "torch.nn.GroupNorm",
            "py:class",
            "generated/torch.nn.GroupNorm.html#torch.nn.GroupNorm",
        ),
        (
            "torch.nn.BatchNorm2d",
            "py:class",
            "generated/torch.nn.BatchNorm2d.html#torch.nn.BatchNorm2d",
        ),
        (
            "torch.nn.SyncBatchNorm",
            "py:class",
            "generated/torch.nn.SyncBatchNorm.html#torch.nn.SyncBatchNorm",
        ),
        (
            "torch.nn.parallel.DistributedDataParallel",
            "py:class",
            "generated/torch.nn.parallel.DistributedDataParallel.html#torch.nn.parallel.DistributedDataParallel",
        ),
        ("torch.amp.GradScaler", "py:class", "amp.html#torch.amp.GradScaler"),
        ("torch.autocast", "py:class", "amp.html#torch.autocast"),
        (
            "torch.autograd.grad",
            "py:function",
            "generated/torch.autograd.grad.html#torch.autograd.grad",
        ),
        (
            "torch.func.vmap",
            "py:function",
            "generated/torch.func.vmap.html#torch.func.vmap",
        ),
        (
            "torch.func.grad",
            "py:function",
            "generated/torch.func.grad.html#torch.func.grad",
        ),
        ("torch.compile", "py:function", "generated/torch.compile.html#torch.compile"),
        (
            "torch.linalg.vector_norm",
            "py:function",
            "generated/torch.linalg.vector_norm.html#torch.linalg.vector_norm",
        ),
    ],
    "numpy": [
        (
            "numpy.ndarray",
            "py:class",
            "reference/generated/numpy.ndarray.html#numpy.ndarray",
        ),
    ],
}


def write(name: str, entries) -> None:
    header = (
        f"# Sphinx inventory version 2\n# Project: {name}\n# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{obj} {role} 1 {uri} -\n" for obj, role, uri in entries)
    (HERE / f"{name}.inv").write_bytes(header.encode() + zlib.compress(body.encode()))


if __name__ == "__main__":
    for name, entries in ENTRIES.items():
        write(name, entries)
