"""Guards of the exact penalties: ops without a double backward and FSDP are refused with a gradpen
error that says what to do instead; the check runs once per critic and leaves no trace."""

from __future__ import annotations

import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import gradpen
from gradpen import _guards
from gradpen._guards import UnsupportedCriticError
from tests import _reference as ref

BACKENDS = ["autograd", "func"]


class OnceSquare(torch.autograd.Function):
    """x**2 whose backward is @once_differentiable (setup_context style, so torch.func can run it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class LegacySquare(torch.autograd.Function):
    """x**2 with a differentiable backward, old style (ctx in forward): torch.func cannot run it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class FnCritic(nn.Module):
    """Linear -> fn -> Linear, or Linear -> tanh -> Linear -> fn when ``last``."""

    def __init__(self, fn, last=False):
        super().__init__()
        self.fn, self.last = fn, last
        self.inp, self.out = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        if self.last:
            return self.fn(self.out(torch.tanh(self.inp(x)))).squeeze(1)
        return self.out(self.fn(self.inp(x))).squeeze(1)


def _x(n=4):
    return torch.randn(n, 3, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("last", [False, True], ids=["inner", "last"])
def test_once_differentiable_critic_is_refused(backend, last):
    """A critic with an @once_differentiable Function raises the gradpen error naming it, on both backends;
    as its last op PyTorch itself would drop the second-order terms without an error."""
    critic = FnCritic(OnceSquare.apply, last).double()
    with pytest.raises(UnsupportedCriticError, match=r"`OnceSquare`.*once_differentiable.*approx_gradient_penalty"):
        gradpen.gradient_penalty(critic, _x(), _x(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_without_derivative_is_refused_with_its_name(backend):
    """An aten op with no double backward (CPU flash attention, forced here) is named in the gradpen error."""

    def attend(x):
        q = x.view(x.shape[0], 1, 2, 4)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0].flatten(1)

    critic = FnCritic(attend).double()
    with pytest.raises(UnsupportedCriticError, match=r"flash_attention_for_cpu_backward is not implemented"):
        gradpen.r1_penalty(critic, _x(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusal_is_an_error_before_the_users_backward(backend):
    """The error comes from the penalty call, is a RuntimeError, and tells the cuDNN RNN remedy."""
    critic = FnCritic(OnceSquare.apply).double()
    with pytest.raises(RuntimeError, match=r"cudnn\.flags\(enabled=False\)"):
        gradpen.gradient_norms(critic, _x(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_without_graph_are_not_refused(backend):
    """gradient_norms(create_graph=False) needs one backward only: it works and equals the reference loop."""
    critic = FnCritic(OnceSquare.apply).double()
    x = _x()
    norms = gradpen.gradient_norms(critic, x, backend=backend, create_graph=False)
    torch.testing.assert_close(norms, ref.per_sample_norms(critic, [x], create_graph=False), rtol=1e-12, atol=0)


def test_func_backend_failure_is_translated():
    """An op vmap cannot run (an old-style autograd.Function) gives a gradpen error that points to autograd."""
    critic = FnCritic(LegacySquare.apply).double()
    x = _x()
    with pytest.raises(UnsupportedCriticError, match=r"backend='func' cannot run.*backend='autograd'"):
        gradpen.gradient_norms(critic, x, backend="func")
    norms = gradpen.gradient_norms(critic, x, backend="autograd")
    torch.testing.assert_close(norms, ref.per_sample_norms(critic, [x]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_is_walked_once_per_critic(backend, monkeypatch):
    """The graph walk runs on a critic's first exact call only (and again in the other training mode)."""
    calls = []
    walk = _guards._graph_problem
    monkeypatch.setattr(_guards, "_graph_problem", lambda *a: calls.append(1) or walk(*a))
    critic = FnCritic(torch.tanh).double()
    for _ in range(3):
        gradpen.gradient_penalty(critic, _x(), _x(), backend=backend)
    assert len(calls) == 1
    critic.eval()
    gradpen.gradient_penalty(critic, _x(), _x(), backend=backend)
    assert len(calls) == 2


def test_func_probe_leaves_the_rng_alone():
    """The func backend's one-sample probe draws no random numbers: dropout draws after it are unchanged."""
    critic = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    x, y = _x(), _x()
    draws = []
    for _ in range(2):  # the probe runs in the first round only
        torch.manual_seed(7)
        gp = gradpen.gradient_penalty(critic, x, y, alpha=torch.full((4,), 0.5, dtype=torch.float64), backend="func")
        draws.append((gp, torch.rand(3)))
    torch.testing.assert_close(draws[0][0], draws[1][0], rtol=0, atol=0)
    torch.testing.assert_close(draws[0][1], draws[1][1], rtol=0, atol=0)


def test_fsdp1_module_is_refused_before_any_work():
    """A critic containing a FullyShardedDataParallel (FSDP1) module is refused before its forward runs.

    FSDP1 needs an accelerator to be built, so the module is made without its __init__; the guard
    looks at the class only. FSDP2 and static-graph DDP run for real in tests/test_fsdp.py."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapped)
    forwards = []
    critic = nn.Sequential(nn.Linear(3, 1))
    critic.add_module("sharded", wrapped)
    critic.register_forward_pre_hook(lambda *a: forwards.append(1))
    for backend in BACKENDS:
        with pytest.raises(UnsupportedCriticError, match=r"FSDP.*`sharded` \(FullyShardedDataParallel\).*approx_r1"):
            gradpen.gradient_penalty(critic, _x(), _x(), backend=backend)
    assert forwards == []


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_lambda_made_on_every_call_is_checked_once(backend, monkeypatch):
    """A critic lambda created anew in every training step (closing over the module, or over nothing) has its
    graph walked once, not on every call."""
    import gradpen._guards as guards

    walks = []
    real_walk = guards._graph_problem
    monkeypatch.setattr(guards, "_graph_problem", lambda *a: walks.append(1) or real_walk(*a))
    monkeypatch.setattr(guards, "_graph_checked", guards.CriticCache())  # forget the other parametrization
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    w = torch.randn(3)
    x = torch.randn(5, 3)
    for _ in range(3):
        gradpen.r1_penalty(lambda x: net(x).squeeze(1), x, backend=backend)
    assert len(walks) == 1
    for _ in range(3):
        gradpen.r1_penalty(lambda x: torch.tanh(x @ w), x, backend=backend)  # w is a closure tensor, no module
    assert len(walks) == 2


# --------------------------------------------------------------------------- modules wherever a user puts them


class _Holder:
    """A callable object wrapping the critic (an EMA helper, a loss object)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x)


def _bn_critic():
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()


def _nested(net):
    inner = lambda x: net(x)
    return lambda x: inner(x)


@pytest.mark.parametrize(
    "wrap",
    [_Holder, _nested, lambda net: (lambda nets: lambda x: nets["d"](x))({"d": net})],
    ids=["callable-object", "nested-closure", "dict-in-closure"],
)
def test_batchnorm_is_seen_behind_wrappers(wrap):
    """BatchNorm is found behind a callable object, a closure over another function and a dict in a closure:
    the autograd backend warns, func refuses."""
    critic = wrap(_bn_critic())
    with pytest.warns(UserWarning, match="BatchNorm in training mode"):
        gradpen.r1_penalty(critic, _x())
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        gradpen.r1_penalty(critic, _x(), backend="func")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_critic_on_the_same_module_is_checked_too(backend):
    """A critic built on an already checked module that adds a @once_differentiable op (a second head) is
    checked and refused: the check is keyed by the code and modules that run, not the first module."""
    net = FnCritic(torch.tanh).double()
    gradpen.r1_penalty(net, _x(), backend=backend)  # checked, fine
    head = lambda x: OnceSquare.apply(net(x))
    with pytest.raises(UnsupportedCriticError, match="once_differentiable"):
        gradpen.r1_penalty(head, _x(), backend=backend)


class _NumpyTanh(torch.autograd.Function):
    """tanh whose backward computes the derivative with NumPy: right once, not differentiable, not marked."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.from_numpy(1 - np.tanh(x.detach().numpy()) ** 2)


def test_a_backward_that_leaves_autograd_is_refused_and_compare_backends_shows_it():
    """A custom Function whose backward uses NumPy (not marked @once_differentiable) is refused by the autograd
    backend; compare_backends reports the refusal and that fd runs it; without the watch the exact gradient
    would be 10 % off (measured here against fd on the differentiable twin)."""
    lin1, lin2 = nn.Linear(3, 16).double(), nn.Linear(16, 1).double()
    critic = lambda x: lin2(torch.tanh(_NumpyTanh.apply(lin1(x))))
    with pytest.raises(UnsupportedCriticError, match=r"_NumpyTanh.*detached from the tensors it saved"):
        gradpen.r1_penalty(critic, _x(8))
    report = gradpen.compare_backends(critic, _x(8))
    assert "autograd" in report.errors and "func" in report.errors and "fd" in report.grads
    twin = lambda x: lin2(torch.tanh(torch.tanh(lin1(x))))
    assert gradpen.compare_backends(twin, _x(8)).agree(tol=1e-6)


class _FakeQuant(torch.autograd.Function):
    """Rounds the weights to a grid with a straight-through backward, marked @once_differentiable (QAT)."""

    @staticmethod
    def forward(ctx, w):
        return (w * 8).round() / 8

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return g


class _Quantised(nn.Module):
    def __init__(self, quant):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2, self.quant = nn.Linear(3, 8).double(), nn.Linear(8, 1).double(), quant

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(self.lin1(x)), self.quant(self.lin2.weight), self.lin2.bias)


class _PlainFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return (w * 8).round() / 8

    @staticmethod
    def backward(ctx, g):
        return g


def test_once_differentiable_op_on_the_weights_only_is_accepted():
    """A straight-through fake quantiser on the weights (never on the input-gradient path) is not refused by the
    autograd backend, and the penalty and its gradients equal those with the @once_differentiable marker
    removed. (func cannot run an old-style Function at all.)"""
    x = _x(6)
    results = []
    for quant in (_FakeQuant.apply, _PlainFakeQuant.apply):
        critic = _Quantised(quant)
        value = gradpen.r1_penalty(critic, x)
        value.backward()
        results.append(
            (value.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in critic.parameters()])
        )
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- the module tree changes between calls


def _plain_critic():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Tanh(), nn.Linear(8, 1)).double()


def _bn():
    return nn.BatchNorm1d(8).double()


_KEPT = []  # replaced layers kept alive (a user may hold them), so that no weak reference of the walk dies

_CHANGES = {
    # Module.__setattr__, the same number of children
    "setitem": lambda c: (_KEPT.append(c[1]), c.__setitem__(1, _bn())),
    # Sequential.insert writes _modules directly
    "insert": lambda c: c.insert(1, _bn()),
    # a private write that replaces an entry in place
    "modules-dict": lambda c: (_KEPT.append(c[1]), c._modules.__setitem__("1", _bn())),
    # one level down
    "nested": lambda c: (_KEPT.append(c[2]), c.__setitem__(2, nn.Sequential(_bn(), nn.Tanh()))),
}


@pytest.mark.parametrize("change", list(_CHANGES), ids=list(_CHANGES))
def test_a_batchnorm_put_in_after_earlier_calls_is_seen(change):
    """The module walk is reused between calls, but never past a change of the tree: a BatchNorm put into a
    critic that has already been penalised (however it is put in) is warned about (autograd) and refused
    (func) at the next call."""
    critic = _plain_critic()
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # the cached checks have all run, and the next call takes the short path
            gradpen.r1_penalty(critic, x).backward()
    _CHANGES[change](critic)
    with pytest.warns(UserWarning, match=r"BatchNorm in training mode \(.*1"):
        gradpen.r1_penalty(critic, x)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        gradpen.r1_penalty(critic, x, backend="func")


def test_a_batchnorm_switched_to_training_mode_alone_is_seen():
    """A BatchNorm in eval mode is fine; switching that one layer (not the critic) to training mode is seen at
    the next call: what the walk found is re-read on every call."""
    critic = nn.Sequential(nn.Linear(3, 8), _bn().eval(), nn.Tanh(), nn.Linear(8, 1)).double()
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            gradpen.r1_penalty(critic, x)
    critic[1].train()
    with pytest.warns(UserWarning, match="BatchNorm in training mode"):
        gradpen.r1_penalty(critic, x)


def test_a_layer_whose_class_changes_is_seen():
    """FSDP2's fully_shard changes a module's class in place; a critic one of whose layers became an FSDP
    module after earlier calls is refused before its next forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch<2.6: FSDP2 lives in torch.distributed._composable.fsdp, its class named FSDP before 2.4
        import torch.distributed._composable.fsdp as composable

        FSDPModule = getattr(composable, "FSDPModule", None) or composable.FSDP

    critic = _plain_critic()
    x = _x()
    gradpen.r1_penalty(critic, x)
    critic[0].__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})
    with pytest.raises(UnsupportedCriticError, match=r"FSDP.*`0` \(FSDPLinear\)"):
        gradpen.r1_penalty(critic, x)


def test_the_module_walk_runs_again_only_when_the_tree_changes(monkeypatch):
    """Calls on an unchanged critic reuse the walk; a change walks again, once."""
    walks = []
    real_walk = _guards._walk
    monkeypatch.setattr(_guards, "_walk", lambda *a: walks.append(1) or real_walk(*a))
    critic = _plain_critic()
    for _ in range(4):
        gradpen.r1_penalty(critic, _x())
    assert len(walks) == 1
    critic[1] = nn.Softplus()
    for _ in range(4):
        gradpen.r1_penalty(critic, _x())
    assert len(walks) == 2


def test_the_module_walk_keeps_no_critic_alive():
    """What the walk remembers holds no module: a critic (with a BatchNorm, which the walk finds) is collected
    once the user drops it, and its entry goes with it."""
    critic = nn.Sequential(nn.Linear(3, 8), _bn().eval(), nn.Tanh(), nn.Linear(8, 1)).double()
    gradpen.r1_penalty(critic, _x()).backward()
    gradpen.gradient_penalty(critic, _x(), _x(), backend="func").backward()
    alive, key = weakref.ref(critic), id(critic)
    assert key in _guards._TREES
    del critic
    gc.collect()
    assert alive() is None
    assert key not in _guards._TREES


def test_a_critic_probed_while_diverged_is_not_taken_for_coupled():
    """The coupling probe of a critic whose weights hold a NaN (a diverged step) sees NaN where a per-sample
    critic has zeros; that is not coupling, and the critic is fine on both backends once its weights are."""
    critic = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    saved = critic[0].weight.detach().clone()
    with torch.no_grad():
        critic[0].weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gradpen.r1_penalty(critic, _x()).isnan()
        with torch.no_grad():
            critic[0].weight.copy_(saved)
        by_autograd = gradpen.gradient_norms(critic, _x(), create_graph=False)
    assert by_autograd.isfinite().all()
    gradpen.r1_penalty(critic, _x(), backend="func")  # not refused as coupled


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_scripted_critic_runs_and_its_batchnorm_is_caught_by_behaviour():
    """A torch.jit.script critic (whose module dictionary is not a dict) gives the plain module's penalty on
    every backend; its BatchNorm, a script module the class-based scan cannot name, is caught by behaviour."""
    torch.manual_seed(0)
    net = _plain_critic()
    scripted = torch.jit.script(net)
    x = _x()
    for backend in ("autograd", "func", "fd"):
        torch.testing.assert_close(
            gradpen.r1_penalty(scripted, x, backend=backend), gradpen.r1_penalty(net, x, backend=backend)
        )
    with_bn = torch.jit.script(nn.Sequential(nn.Linear(3, 8), _bn(), nn.Tanh(), nn.Linear(8, 1)).double())
    with pytest.warns(UserWarning, match="couples the samples"):
        gradpen.r1_penalty(with_bn, x)
    with pytest.raises(ValueError, match="couples the samples"):
        gradpen.r1_penalty(with_bn, x, backend="func")
