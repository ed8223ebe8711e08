"""What critic_args/critic_kwargs mean: per-sample rows vs shared tensors, the same on both backends."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_map

import gradpen
from tests import _reference as ref

BACKENDS = ["autograd", "func"]
F64 = {"dtype": torch.float64}


def _prototype_critic():
    """A critic that scores x against a table of prototypes: the table is used whole by every sample."""
    torch.manual_seed(0)
    head = nn.Linear(4, 1).double()

    def critic(x, protos):
        return head(torch.tanh(x @ protos.T)).squeeze(1)

    return critic


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_table_with_n_rows_is_not_split(backend):
    """A shared table that happens to have N rows, marked gradpen.shared, gives the loop reference's norms."""
    critic = _prototype_critic()
    x, protos = torch.randn(4, 3, **F64), torch.randn(4, 3, **F64)  # N == number of prototypes
    want = ref.per_sample_norms(lambda xi: critic(xi, protos), [x])
    got = gradpen.gradient_norms(critic, x, critic_args=(gradpen.shared(protos),), backend=backend)
    torch.testing.assert_close(got, want.detach())


def test_unmarked_table_with_other_row_count_is_refused():
    """A tensor argument whose leading dimension is not N gets an error naming it and gradpen.shared."""
    critic = _prototype_critic()
    x, protos = torch.randn(4, 3, **F64), torch.randn(5, 3, **F64)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"`critic_args\[0\]` has leading dimension 5.*N=4.*gradpen\.shared"):
            gradpen.gradient_norms(critic, x, critic_args=(protos,), backend=backend)
        with pytest.raises(ValueError, match=r"`critic_kwargs\['protos'\]` has leading dimension 5"):
            gradpen.gradient_norms(critic, x, critic_kwargs={"protos": protos}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_and_scalars_are_shared(backend):
    """nn.Parameters (even with N rows) and 0-d tensors are shared and receive the penalty's gradient."""
    critic = _prototype_critic()
    x = torch.randn(4, 3, **F64)
    protos = nn.Parameter(torch.randn(4, 3, **F64))
    temp = torch.tensor(2.0, **F64, requires_grad=True)

    def scaled(x, protos, *, temp):
        return critic(x / temp, protos)

    want = ref.per_sample_norms(lambda xi: scaled(xi, protos, temp=temp), [x]).square().mean()
    want_grads = torch.autograd.grad(want, (protos, temp))
    got = gradpen.r1_penalty(scaled, x, critic_args=(protos,), critic_kwargs={"temp": temp}, backend=backend)
    got_grads = torch.autograd.grad(got, (protos, temp))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_tensor_receives_gradients(backend):
    """A shared tensor computed from parameters keeps its graph: the penalty trains what produced it."""
    critic = _prototype_critic()
    x = torch.randn(6, 3, **F64)
    base = torch.randn(4, 3, **F64, requires_grad=True)
    protos = 2.0 * base  # computed in the training loop, not a Parameter
    want = ref.per_sample_norms(lambda xi: critic(xi, protos), [x]).square().mean()
    (want_grad,) = torch.autograd.grad(want, base, retain_graph=True)
    got = gradpen.r1_penalty(critic, x, critic_args=(gradpen.shared(protos),), backend=backend)
    (got_grad,) = torch.autograd.grad(got, base)
    torch.testing.assert_close(got_grad, want_grad)


@given(n=st.integers(1, 6), nested=st.sampled_from(["list", "dict", "tuple"]))
def test_nested_per_sample_tensors_match_the_loop(n, nested):
    """Per-sample tensors inside lists, tuples and dicts are split by row on func, passed whole on autograd,
    and both equal the loop reference that hands sample i its row i."""
    torch.manual_seed(n)
    w = torch.randn(3, **F64)

    def critic(x, cond):
        a, b = (cond["a"], cond["b"]) if isinstance(cond, dict) else cond
        return torch.tanh(x @ w + a) * b.sum(1)

    x, a, b = torch.randn(n, 3, **F64), torch.randn(n, **F64), torch.randn(n, 2, **F64)
    cond = {"a": a, "b": b} if nested == "dict" else ([a, b] if nested == "list" else (a, b))
    row = lambda i: tree_map(lambda t: t[i : i + 1], cond)  # sample i's conditions
    want = torch.cat([ref.per_sample_norms(lambda xi, i=i: critic(xi, row(i)), [x[i : i + 1]]) for i in range(n)])
    for backend in BACKENDS:
        got = gradpen.gradient_norms(critic, x, critic_args=(cond,), backend=backend)
        torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_conditions_are_constants(backend):
    """A per-sample condition that requires grad (an encoder's output) receives no gradient from the penalty."""
    encoder = nn.Linear(2, 3).double()
    body = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    critic = lambda x, c: body(x * c).squeeze(1)
    x, text = torch.randn(5, 3, **F64), torch.randn(5, 2, **F64)
    cond = encoder(text)  # requires grad through the encoder
    gp = gradpen.gradient_penalty(critic, x, torch.randn(5, 3, **F64), critic_args=(cond,), backend=backend)
    gp.backward()
    assert encoder.weight.grad is None
    assert all(p.grad is not None for p in body[0].parameters())


def test_shared_marker_rejects_non_tensors():
    """gradpen.shared takes a tensor and says so otherwise."""
    with pytest.raises(TypeError, match=r"`gradpen\.shared` takes a Tensor, got list"):
        gradpen.shared([1, 2])


# --------------------------------------------------------------------------- forgetting gradpen.shared


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmarked_learnable_table_with_n_rows_warns_on_both_backends(backend):
    """A leaf tensor that requires grad and has N rows by chance is per-sample by the rule; both backends warn
    that its gradient is dropped and point to gradpen.shared; wrapped in shared it gets no warning."""
    critic = _prototype_critic()
    x, table = torch.randn(4, 3, **F64), torch.randn(4, 3, **F64, requires_grad=True)
    warns = pytest.warns(UserWarning, match=r"critic_args\[0\]` is a leaf tensor that requires grad.*gradpen.shared")
    if backend == "autograd":
        with warns:
            gradpen.r1_penalty(critic, x, critic_args=(table,), backend=backend)
    else:  # func then also fails: one row of the table is not a table, and it says so
        with warns, pytest.raises(RuntimeError, match=r"gradpen\.shared"):
            gradpen.r1_penalty(critic, x, critic_args=(table,), backend=backend)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradpen.r1_penalty(critic, x, critic_args=(gradpen.shared(table),), backend=backend)


def test_func_says_which_per_sample_tensor_it_sliced():
    """When the critic fails on func's one-sample rows, the error names the per-sample tensors and
    gradpen.shared, not only the raw IndexError."""
    emb = torch.randn(4, 5, **F64)  # an embedding table with N=4 rows, not marked shared
    labels = torch.tensor([0, 3, 1, 2])
    critic = lambda x, table, y: (x * table[y]).sum(1)
    with pytest.raises((IndexError, RuntimeError), match=r"critic_args\[0\], critic_args\[1\].*gradpen.shared"):
        gradpen.r1_penalty(critic, torch.randn(4, 5, **F64), critic_args=(emb, labels), backend="func")


def test_a_list_of_n_labels_is_passed_whole_and_func_says_why_it_fails():
    """A per-sample list of N labels (a collate's output) is passed whole: autograd gives the loop's norms,
    func explains that it calls the critic on one sample and asks for a tensor."""
    labels = [0, 2, 1, 0]
    w = torch.randn(2, 3, **F64)
    critic = lambda x, y: (x @ w)[torch.arange(len(y)), torch.tensor(y)].tanh()
    x = torch.randn(4, 2, **F64)
    want = torch.stack(
        [gradpen.gradient_norms(lambda z, i=i: critic(z, [labels[i]]), x[i : i + 1])[0] for i in range(4)]
    )
    torch.testing.assert_close(gradpen.gradient_norms(critic, x, critic_args=(labels,)), want)
    with pytest.raises((ValueError, IndexError), match=r"one sample at a time.*(list|N=4).*as a tensor with N"):
        gradpen.gradient_norms(critic, x, critic_args=(labels,), backend="func")
