"""Several forwards of one penalty see one critic: the same dropout masks and the same buffer values (spectral
normalisation's u and v), for the estimators (approx_*) and the fd backend; afterwards the RNG and the
buffers are where one forward leaves them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradpen
from gradpen._forwards import Replay

F64 = {"dtype": torch.float64}
SPECTRAL = {
    "old": torch.nn.utils.spectral_norm,
    "parametrization": torch.nn.utils.parametrizations.spectral_norm,
}


def _sn_critic(style, dropout=0.0):
    torch.manual_seed(0)
    sn = SPECTRAL[style]
    layers = [sn(nn.Linear(6, 32)), nn.SiLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, sn(nn.Linear(32, 1))).double()


def _grads(module):
    out = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in module.parameters()])
    module.zero_grad(set_to_none=True)
    return out


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def _estimate(critic, module, x, start, seed=3, draws=2):
    """approx_r1_penalty from the state ``start`` and the RNG state ``seed``: (value, gradient, buffers after)."""
    module.load_state_dict(start)
    torch.manual_seed(seed)
    est = gradpen.approx_r1_penalty(critic, x, draws=draws, generator=torch.Generator().manual_seed(7))
    est.backward()
    return est.detach(), _grads(module), _buffers(module)


@pytest.mark.parametrize("style", sorted(SPECTRAL))
def test_spectral_norm_critic_behind_a_lambda_equals_the_module(style):
    """A freshly built spectral-norm critic (where the power iteration moves most) behind a lambda, whose module
    gradpen finds in the closure, gives the estimate and gradients of the module called directly, with the
    same eps; the buffers afterwards are those one forward leaves."""
    critic = _sn_critic(style)
    x = torch.randn(32, 6, **F64)
    start = {k: v.clone() for k, v in critic.state_dict().items()}
    fused = _estimate(critic, critic, x, start)
    separate = _estimate(lambda z: critic(z), critic, x, start)
    torch.testing.assert_close(separate[0], fused[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(separate[1], fused[1], rtol=1e-10, atol=1e-14)
    critic.load_state_dict(start)
    critic(x)
    one = _buffers(critic)
    for name, value in one.items():
        assert torch.equal(separate[2][name], value), name
        assert torch.equal(fused[2][name], value), name


def _hand_estimate(critic, x, start_buffers, sigma=0.01, seed=3):
    """The forward-scheme estimate with one draw, written out: each forward from the RNG state ``seed`` and the
    buffer values ``start_buffers``. Returns (estimate, parameter gradient, RNG and buffers after one forward)."""
    buffers = dict(critic.named_buffers())

    def reset():
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, value in start_buffers.items():
                buffers[name].copy_(value)

    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), **F64)
    reset()
    at_x = critic(x).squeeze(1)
    after = (torch.get_rng_state(), _buffers(critic))
    reset()
    at_moved = critic(x + sigma * eps).squeeze(1)
    want = ((at_moved - at_x) / sigma).square().mean()
    want.backward()
    return want.detach(), _grads(critic), after


@pytest.mark.parametrize("style", sorted(SPECTRAL))
@pytest.mark.parametrize("wrap", ["module", "lambda"])
def test_spectral_norm_critic_with_dropout_replays_masks_and_buffers(style, wrap):
    """A spectral-norm critic with dropout (separate forwards), called directly or through a lambda: the
    estimate equals a hand-written one whose every forward starts from the same RNG state and buffer values;
    the RNG and the buffers afterwards are those of one forward."""
    critic = _sn_critic(style, dropout=0.2)
    x = torch.randn(16, 6, **F64)
    start = {k: v.clone() for k, v in critic.state_dict().items()}
    got = _estimate(critic if wrap == "module" else (lambda z: critic(z)), critic, x, start, draws=1)
    rng_after = torch.get_rng_state()
    critic.load_state_dict(start)
    want, want_grad, (one_rng, one_buffers) = _hand_estimate(critic, x, _buffers(critic))
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], want_grad, rtol=1e-10, atol=1e-14)
    assert torch.equal(rng_after, one_rng)
    for name, value in one_buffers.items():
        assert torch.equal(got[2][name], value), name


def test_the_separate_path_without_buffer_replay_is_far_off(monkeypatch):
    """The failure the replay prevents: with only the RNG restored between the forwards (the buffers not), a
    fresh spectral-norm critic with dropout gets an estimate many times the right one, so the comparison
    above can fail."""
    critic = _sn_critic("old", dropout=0.2)
    x = torch.randn(16, 6, **F64)
    start = {k: v.clone() for k, v in critic.state_dict().items()}
    want = _hand_estimate(critic, x, _buffers(critic))[0]
    from gradpen import _forwards

    def rng_only(self):
        if self.drew_random:
            _forwards.set_rng_state(self.device, self.rng_before)

    monkeypatch.setattr(_forwards.Replay, "rewind", rng_only)
    broken = _estimate(critic, critic, x, start, draws=1)
    assert (broken[0] / want).item() > 10.0


def test_replay_restores_a_rebound_buffer_and_reports_writes():
    """Replay puts back a buffer that the forward replaced by a new tensor (not written in place), and says
    what the first forward did (drew random numbers, wrote buffers)."""

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen = self.seen + 1  # a new tensor, not an in-place write
            return x.sum(1) * self.seen + torch.rand(()).mul(0)

    m = Counter()
    x = torch.randn(3, 2)
    replay = Replay(m, x.device)
    m(x)
    replay.done()
    assert replay.wrote_buffers and replay.drew_random
    replay.rewind()
    assert m.seen.item() == 0.0
    m(x)
    replay.finish()
    assert m.seen.item() == 1.0


def test_fd_with_spectral_norm_behind_a_lambda():
    """fd on a spectral-norm critic behind a lambda equals fd (and the exact penalty) on the module itself."""
    critic = _sn_critic("parametrization")
    x = torch.randn(16, 6, **F64)
    start = {k: v.clone() for k, v in critic.state_dict().items()}
    results = []
    for c, backend in [(critic, "autograd"), (critic, "fd"), (lambda z: critic(z), "fd")]:
        critic.load_state_dict(start)
        value = gradpen.r1_penalty(c, x, backend=backend)
        value.backward()
        results.append((value.detach(), _grads(critic)))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=0)
        assert ((grad - results[0][1]).norm() / results[0][1].norm()).item() <= 1e-6
