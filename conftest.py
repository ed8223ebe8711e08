"""Root conftest: names available to the doctests of the package and of the docs."""

import pytest
import torch

import gradpen


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    torch.manual_seed(0)
    doctest_namespace.update(torch=torch, gradpen=gradpen, nn=torch.nn)
