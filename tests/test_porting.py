"""The porting page (docs/porting.md): each gradpen replacement against the computation it replaces.

Every ``original_*`` function is a hand-written equivalent of what a public GAN codebase computes for
its penalty, written from the description on the porting page (which tensors, which norm, which
reduction, which weight, in which forward), not copied from it. Every ``ported_*`` function is the
same step with the gradpen lines of the page. Both run in float64 on small critics from fixed seeds;
the penalty values and the critic's parameter gradients after ``backward()`` must agree to 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradpen

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-14}
N = 8


# --------------------------------------------------------------------------- critics and helpers


class MinibatchStd(nn.Module):
    """A minibatch standard deviation layer in the manner of StyleGAN2's discriminators (written here).

    The batch is split into ``n // g`` groups of ``g`` samples, sample ``i`` in group ``i % (n // g)``.
    Each group's standard deviation over its ``g`` samples, averaged over all features, is appended
    as one constant channel to every sample of the group: a sample's score depends on its group.
    """

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x):
        n, c, h, w = x.shape
        g = min(self.group, n)
        groups = x.reshape(g, n // g, c, h, w)
        spread = (groups.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // g,)
        channel = spread.repeat(g).view(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, channel], dim=1)


def mlp_critic(seed: int = 0, d: int = 64) -> nn.Module:
    """PyTorch-GAN's critic shape: flatten, two hidden LeakyReLU layers, one score (N, 1)."""
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(d, 32), nn.LeakyReLU(0.2), nn.Linear(32, 16), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(16, 1)).to(F64)


def conv_critic(seed: int = 0, mbstd: bool = False, group: int = 4) -> nn.Module:
    """A StyleGAN-like conv critic on (N, 3, 8, 8), with or without a minibatch-std layer."""
    torch.manual_seed(seed)
    extra = 1 if mbstd else 0
    layers = [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        *([MinibatchStd(group)] if mbstd else []),
        nn.Conv2d(4 + extra, 4, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 1),
    ]
    return nn.Sequential(*layers).to(F64)


class DictCritic(nn.Module):
    """A StudioGAN-style conditional critic: returns a dict whose "adv_output" holds the scores (N,)."""

    def __init__(self, seed: int = 0, classes: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.LeakyReLU(0.2))
        self.head = nn.Linear(16, 1)
        self.embed = nn.Embedding(classes, 16)  # projection discriminator: score += <embed(y), h>
        self.to(F64)

    def forward(self, x, labels):
        h = self.body(x)
        return {"adv_output": self.head(h).squeeze(1) + (self.embed(labels) * h).sum(1)}


def backward_grads(module: nn.Module, loss: torch.Tensor) -> list[torch.Tensor | None]:
    """Clear the grads, backpropagate ``loss``, return copies of the parameters' grads (None kept)."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def assert_same(got, want) -> None:
    """Equal values (1e-12 relative); for lists of grads also the same pattern of None."""
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, **TOL)
        return
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, **TOL)


def images(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- PyTorch-GAN: WGAN-GP


def original_wgan_gp(critic, real, fake, alpha, lambda_gp=10.0):
    """One alpha per sample (N, 1, 1, 1); the critic at the interpolates made a leaf; input gradients
    with grad_outputs of ones; flattened per sample; (||g|| - 1)^2 averaged; lambda_gp outside."""
    a = alpha.view(-1, 1, 1, 1)
    x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
    out = critic(x_hat)
    (g,) = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True, retain_graph=True)
    gp = ((g.view(g.shape[0], -1).norm(2, dim=1) - 1) ** 2).mean()
    loss_d = -critic(real).mean() + critic(fake).mean() + lambda_gp * gp
    return gp, backward_grads(critic, loss_d)


def ported_wgan_gp(critic, real, fake, alpha, lambda_gp=10.0):
    gp = gradpen.gradient_penalty(critic, real, fake, alpha=alpha)
    loss_d = -critic(real).mean() + critic(fake).mean() + lambda_gp * gp
    return gp, backward_grads(critic, loss_d)


def test_pytorch_gan_wgan_gp():
    """PyTorch-GAN wgan_gp.py: gradient_penalty at the same alpha, times lambda_gp = 10 outside."""
    real, fake = images(N, 1, 8, 8, seed=1), images(N, 1, 8, 8, seed=2)
    alpha = torch.rand(N, dtype=F64, generator=torch.Generator().manual_seed(3))
    critic = mlp_critic()
    want = original_wgan_gp(critic, real, fake, alpha)
    got = ported_wgan_gp(critic, real, fake, alpha)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])


# --------------------------------------------------------------------------- PyTorch-GAN: WGAN-div


def tiny_generator(seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8))).to(F64)


def original_wgan_div(critic, generator, real, z, k=2.0, p=6.0):
    """Gradients at the real batch (a leaf) and at the generator's output (not detached), from the
    loss's own two forwards; per sample (sum of squares over all dims) ** (p / 2), i.e. ||g||^p;
    the batch mean of the real and fake terms' sum, times k / 2."""
    real = real.clone().requires_grad_(True)
    fake = generator(z)
    d_real, d_fake = critic(real), critic(fake)
    ones = torch.ones_like(d_real)
    (g_r,) = torch.autograd.grad(d_real, real, ones, create_graph=True, retain_graph=True)
    (g_f,) = torch.autograd.grad(d_fake, fake, ones, create_graph=True, retain_graph=True)
    pow_r = g_r.reshape(N, -1).pow(2).sum(1) ** (p / 2)
    pow_f = g_f.reshape(N, -1).pow(2).sum(1) ** (p / 2)
    div = (pow_r + pow_f).mean() * k / 2
    loss_d = -d_real.mean() + d_fake.mean() + div
    generator.zero_grad(set_to_none=True)
    grads = backward_grads(critic, loss_d)
    return div, grads, [q.grad for q in generator.parameters()]


def ported_wgan_div(critic, generator, real, z):
    fake = generator(z).detach()  # the port detaches the fake batch
    div = gradpen.wgan_div_penalty(critic, real, fake)  # k = 2, p = 6: (k/2) E[||g_r||^p + ||g_f||^p]
    loss_d = -critic(real).mean() + critic(fake).mean() + div
    generator.zero_grad(set_to_none=True)
    grads = backward_grads(critic, loss_d)
    return div, grads, [q.grad for q in generator.parameters()]


def ported_wgan_div_from_forward(critic, generator, real, z, k=2.0, p=6.0):
    real_x = real.detach().requires_grad_(True)
    fake_x = generator(z).detach().requires_grad_(True)
    d_real, d_fake = critic(real_x), critic(fake_x)
    n_r = gradpen.gradient_norms_from(d_real, real_x)
    n_f = gradpen.gradient_norms_from(d_fake, fake_x)
    div = (k / 2) * (n_r**p + n_f**p).mean()
    loss_d = -d_real.mean() + d_fake.mean() + div
    return div, backward_grads(critic, loss_d)


def _div_critic():
    critic = mlp_critic(seed=4)
    with torch.no_grad():  # input weights scaled up so that the gradient norms are near 1 (p = 6)
        critic[1].weight.mul_(10.0)
    return critic


def test_pytorch_gan_wgan_div():
    """PyTorch-GAN wgan_div.py: wgan_div_penalty(k=2, p=6) equals k/2 * mean(||g_r||^6 + ||g_f||^6),
    the critic's gradients too; the original's penalty also reaches the generator, the port's does not."""
    real, z = images(N, 1, 8, 8, seed=1), images(N, 4, seed=2)
    critic, generator = _div_critic(), tiny_generator()
    want = original_wgan_div(critic, generator, real, z)
    assert want[0] > 0.1  # the norms are not negligible
    got = ported_wgan_div(critic, generator, real, z)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert all(g is not None for g in want[2])  # zeroed by PyTorch-GAN before its generator step
    assert all(g is None for g in got[2])


def test_pytorch_gan_wgan_div_from_the_loss_forward():
    """WGAN-div from the loss's own forwards (gradient_norms_from at real and fake leaves) equals it too."""
    real, z = images(N, 1, 8, 8, seed=1), images(N, 4, seed=2)
    critic, generator = _div_critic(), tiny_generator()
    want = original_wgan_div(critic, generator, real, z)
    got = ported_wgan_div_from_forward(critic, generator, real, z)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])


# --------------------------------------------------------------------------- StyleGAN2, rosinality


def rosinality_adam(critic, lr, k):
    """rosinality's D optimizer written out: lr * k/(k+1), betas (0, 0.99) ** (k/(k+1))."""
    ratio = k / (k + 1)
    return torch.optim.Adam(critic.parameters(), lr=lr * ratio, betas=(0**ratio, 0.99**ratio))


def original_rosinality_r1(critic, real):
    """A fresh forward on the real batch made to require grad; the gradient of the summed
    predictions; squares summed per sample, averaged over the batch."""
    real = real.detach().clone()
    real.requires_grad = True
    pred = critic(real)
    (g,) = torch.autograd.grad(pred.sum(), real, create_graph=True)
    return g.pow(2).reshape(g.shape[0], -1).sum(1).mean(), pred


def ported_rosinality_r1(critic, real):
    real_x = real.detach().requires_grad_(True)
    pred = critic(real_x)
    return gradpen.gradient_norms_from(pred, real_x).square().mean(), pred


def rosinality_run(critic, batches, r1_of, opt, k, gamma):
    """rosinality's D schedule: a logistic-loss step every iteration, and on iterations i % k == 0 a
    second step on (gamma / 2) * R1 * k (plus zero times one prediction). Returns the R1 log."""
    log = []
    for i, (real, fake) in enumerate(batches):
        loss_d = F.softplus(critic(fake)).mean() + F.softplus(-critic(real)).mean()
        critic.zero_grad()
        loss_d.backward()
        opt.step()
        if i % k == 0:
            r1, pred = r1_of(critic, real)
            critic.zero_grad()
            (gamma / 2 * r1 * k + 0 * pred[0]).backward()
            opt.step()
            log.append((i, r1.detach()))
    return log


def _stylegan_batches(count, seed=10):
    return [(images(N, 3, 8, 8, seed=seed + 2 * i), images(N, 3, 8, 8, seed=seed + 2 * i + 1)) for i in range(count)]


def test_rosinality_r1_step():
    """rosinality d_r1_loss: gradient_norms_from(...).square().mean() on a minibatch-std critic, value and
    the critic's gradients of (gamma/2) R1 k + 0 * pred[0] (the last bias gets a zero, not None)."""
    critic, real = conv_critic(mbstd=True), images(N, 3, 8, 8, seed=1)
    want_r1, pred = original_rosinality_r1(critic, real)
    want = backward_grads(critic, 10.0 / 2 * want_r1 * 16 + 0 * pred[0])
    got_r1, pred = ported_rosinality_r1(critic, real)
    got = backward_grads(critic, 10.0 / 2 * got_r1 * 16 + 0 * pred[0])
    assert_same(got_r1, want_r1)
    assert_same(got, want)
    assert got[-1] is not None and not got[-1].any()


def test_rosinality_lazy_schedule():
    """rosinality's lazy schedule (k = 3, 7 iterations): R1 on iterations 0, 3, 6, the same values, and the
    same parameters after all steps with gradpen's lines and lazy_adam_kwargs' optimizer."""
    k, gamma, lr, batches = 3, 10.0, 2e-3, _stylegan_batches(7)
    a, b = conv_critic(mbstd=True), conv_critic(mbstd=True)
    opt_a = rosinality_adam(a, lr, k)
    opt_b = torch.optim.Adam(b.parameters(), **gradpen.lazy_adam_kwargs(lr, (0.0, 0.99), every=k))
    log_a = rosinality_run(a, batches, original_rosinality_r1, opt_a, k, gamma)
    log_b = rosinality_run(b, batches, ported_rosinality_r1, opt_b, k, gamma)
    assert [i for i, _ in log_a] == [i for i, _ in log_b] == [0, 3, 6]
    for (_, r_a), (_, r_b) in zip(log_a, log_b, strict=True):
        assert_same(r_b, r_a)
    for p_a, p_b in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p_b, p_a, **TOL)


def test_lazy_adam_kwargs_formula():
    """lazy_adam_kwargs: lr * k/(k+1) and each beta ** (k/(k+1)), as both StyleGAN2 codebases compute them."""
    for lr, betas, k in [
        (2e-3, (0.0, 0.99), 16),
        (2.5e-3, (0.0, 0.99), 16),
        (2e-3, (0.0, 0.99), 4),
        (1e-3, (0.5, 0.9), 3),
    ]:
        got = gradpen.lazy_adam_kwargs(lr, betas, every=k)
        c = k / (k + 1)
        assert got["lr"] == lr * c
        assert tuple(got["betas"]) == (betas[0] ** c, betas[1] ** c)


def test_gradient_penalty_module_lazy_calls():
    """GradientPenalty(kind='r1', weight=gamma/2, every=k): calls 0, k, 2k return k * (gamma/2) * R1, the
    others an exact zero; R1 is rosinality's (batch mean of per-sample squared norms)."""
    k, gamma = 4, 10.0
    critic, real = conv_critic(), images(N, 3, 8, 8, seed=1)
    pen = gradpen.GradientPenalty(weight=gamma / 2, kind="r1", every=k)
    r1, _ = original_rosinality_r1(critic, real)
    for call in range(2 * k + 1):
        out = pen(critic, real, None)
        if call % k == 0:
            torch.testing.assert_close(out, k * (gamma / 2) * r1, **TOL)
        else:
            assert out.item() == 0.0
    assert pen.calls == 2 * k + 1


# --------------------------------------------------------------------------- StyleGAN2-ADA, NVlabs


def original_nvlabs_r1(logits, real_tmp):
    """Gradient of the summed logits with respect to the leaf; squares summed over (C, H, W): (N,)."""
    (g,) = torch.autograd.grad(logits.sum(), real_tmp, create_graph=True)
    return g.square().sum([1, 2, 3])


def ported_nvlabs_r1(logits, real_tmp):
    return gradpen.gradient_norms_from(logits, real_tmp).square()


def nvlabs_dreg_loss(critic, real, r1_of, gamma, gain):
    """The Dreg phase: a forward on real.detach().requires_grad_(True); zero times the logits plus the
    per-sample R1 times gamma / 2, averaged, times the phase's interval (the gain)."""
    real_tmp = real.detach().requires_grad_(True)
    logits = critic(real_tmp)  # (N, 1)
    r1 = r1_of(logits, real_tmp)  # (N,)
    loss = (logits * 0 + r1 * (gamma / 2)).mean().mul(gain)  # (N, 1) + (N,): the mean is r1's
    return r1, loss


def nvlabs_run(critic, batches, r1_of, opt, k, gamma):
    """NVlabs' D phases: Dmain every batch, Dreg (gain = interval = k) when batch_idx % k == 0; one Adam."""
    log = []
    for batch_idx, (real, fake) in enumerate(batches):
        phases = [("Dmain", 1)] + ([("Dreg", k)] if batch_idx % k == 0 else [])
        for name, gain in phases:
            opt.zero_grad(set_to_none=True)
            if name == "Dmain":
                F.softplus(critic(fake)).mean().mul(gain).backward()
                logits = critic(real.detach())
                (logits * 0 + F.softplus(-logits)).mean().mul(gain).backward()
            else:
                r1, loss = nvlabs_dreg_loss(critic, real, r1_of, gamma, gain)
                loss.backward()
                log.append((batch_idx, r1.detach()))
            for p in critic.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
    return log


def test_nvlabs_r1_step():
    """NVlabs loss.py Dreg: gradient_norms_from(...).square() is r1_penalty (N,), on a minibatch-std critic
    (group 4), value and gradients of (logits * 0 + r1 * gamma/2).mean() * 16."""
    critic, real = conv_critic(mbstd=True, group=4), images(N, 3, 8, 8, seed=1)
    want_r1, loss = nvlabs_dreg_loss(critic, real, original_nvlabs_r1, 10.0, 16)
    want = backward_grads(critic, loss)
    got_r1, loss = nvlabs_dreg_loss(critic, real, ported_nvlabs_r1, 10.0, 16)
    got = backward_grads(critic, loss)
    assert_same(got_r1, want_r1)
    assert_same(got, want)


def test_nvlabs_lazy_schedule():
    """NVlabs' phases (interval k = 3, 7 batches): Dreg on batches 0, 3, 6 with gain k, the same R1 values,
    and the same parameters with lazy_adam_kwargs as with the mb_ratio correction written out."""
    k, gamma, lr, batches = 3, 10.0, 2.5e-3, _stylegan_batches(7, seed=40)
    a, b = conv_critic(mbstd=True), conv_critic(mbstd=True)
    ratio = k / (k + 1)
    opt_a = torch.optim.Adam(a.parameters(), lr=lr * ratio, betas=[beta**ratio for beta in (0.0, 0.99)])
    opt_b = torch.optim.Adam(b.parameters(), **gradpen.lazy_adam_kwargs(lr, (0.0, 0.99), every=k))
    log_a = nvlabs_run(a, batches, original_nvlabs_r1, opt_a, k, gamma)
    log_b = nvlabs_run(b, batches, ported_nvlabs_r1, opt_b, k, gamma)
    assert [i for i, _ in log_a] == [i for i, _ in log_b] == [0, 3, 6]
    for (_, r_a), (_, r_b) in zip(log_a, log_b, strict=True):
        assert_same(r_b, r_a)
    for p_a, p_b in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p_b, p_a, **TOL)


# --------------------------------------------------------------------------- R3GAN


def augment(x):
    """A fixed differentiable preprocessing between the leaf and the critic (R3GAN's Preprocessor)."""
    return 0.9 * torch.flip(x, dims=[3]) + 0.05


def original_r3gan(critic, real, fake, gamma):
    """Leaves made before the forward, the critic on the preprocessed leaves; R1 and R2 per sample: squares
    of the gradient of the summed logits, summed over (C, H, W); softplus(-(real - fake)) plus
    (gamma / 2) (R1 + R2), averaged over the batch."""
    real_x = real.detach().requires_grad_(True)
    fake_x = fake.detach().requires_grad_(True)
    d_real, d_fake = critic(augment(real_x)), critic(augment(fake_x))
    (g_r,) = torch.autograd.grad(d_real.sum(), real_x, create_graph=True)
    (g_f,) = torch.autograd.grad(d_fake.sum(), fake_x, create_graph=True)
    r1 = g_r.square().sum([1, 2, 3]).reshape_as(d_real)
    r2 = g_f.square().sum([1, 2, 3]).reshape_as(d_real)
    loss = (F.softplus(-(d_real - d_fake)) + (gamma / 2) * (r1 + r2)).mean()
    return (r1.mean(), r2.mean()), backward_grads(critic, loss)


def ported_r3gan(critic, real, fake, gamma):
    real_x = real.detach().requires_grad_(True)
    fake_x = fake.detach().requires_grad_(True)
    d_real, d_fake = critic(augment(real_x)), critic(augment(fake_x))
    r1 = gradpen.gradient_norms_from(d_real, real_x).square()  # (outputs, inputs)
    r2 = gradpen.gradient_norms_from(d_fake, fake_x).square()
    loss = F.softplus(d_fake - d_real).mean() + (gamma / 2) * (r1 + r2).mean()
    return (r1.mean(), r2.mean()), backward_grads(critic, loss)


def test_r3gan_r1_r2():
    """R3GAN Trainer.py: R1 and R2 from the loss's forwards through a preprocessing, weight gamma/2 each."""
    critic, real, fake = conv_critic(seed=7), images(N, 3, 8, 8, seed=1), images(N, 3, 8, 8, seed=2)
    want = original_r3gan(critic, real, fake, gamma=0.05)
    got = ported_r3gan(critic, real, fake, gamma=0.05)
    assert_same(got[0][0], want[0][0])
    assert_same(got[0][1], want[0][1])
    assert_same(got[1], want[1])


# --------------------------------------------------------------------------- StudioGAN


def studio_interpolates(real, fake, alpha):
    a = alpha.view(-1, 1, 1, 1).expand_as(real)  # one alpha per sample, expanded over (C, H, W)
    return (a * real + (1 - a) * fake).requires_grad_(True)


def studio_grads(critic, x, labels):
    out = critic(x, labels)["adv_output"]
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True, retain_graph=True)
    return g.reshape(g.shape[0], -1)


def original_studio_gp(critic, real, fake, labels, alpha):
    """cal_grad_penalty: the conditional critic at the interpolates with the real labels;
    (||g|| - 1)^2 averaged over the batch (gp_lambda outside)."""
    g = studio_grads(critic, studio_interpolates(real, fake, alpha), labels)
    return ((g.norm(2, dim=1) - 1) ** 2).mean()


def original_studio_maxgp(critic, real, fake, labels, alpha):
    """cal_maxgrad_penalty: the largest squared norm in the batch (maxgp_lambda outside)."""
    g = studio_grads(critic, studio_interpolates(real, fake, alpha), labels)
    return torch.max(g.norm(2, dim=1) ** 2)


def original_studio_dra(critic, real, labels, u, alpha):
    """cal_dra_penalty: x + alpha * 0.5 * std(x) * u with the whole batch's sample (n - 1) standard
    deviation, u per element, alpha per sample; (||g|| - 1)^2 averaged (dra_lambda outside)."""
    x_hat = (real + alpha.view(-1, 1, 1, 1) * (0.5 * real.std() * u)).requires_grad_(True)
    g = studio_grads(critic, x_hat, labels)
    return ((g.norm(2, dim=1) - 1) ** 2).mean()


def original_studio_r1(adv_output, real_x):
    """cal_r1_reg: from the loss's forward; 0.5 times the batch mean of the per-sample squared sums
    (r1_lambda outside)."""
    (g,) = torch.autograd.grad(adv_output.sum(), real_x, create_graph=True, retain_graph=True)
    return 0.5 * g.pow(2).reshape(g.shape[0], -1).sum(1).mean(0)


def _studio_setup():
    critic = DictCritic()
    real, fake = images(N, 3, 8, 8, seed=1), images(N, 3, 8, 8, seed=2)
    labels = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(3))
    alpha = torch.rand(N, dtype=F64, generator=torch.Generator().manual_seed(4))
    score = lambda x, y: critic(x, y)["adv_output"]
    return critic, score, real, fake, labels, alpha


def test_studiogan_grad_penalty():
    """StudioGAN cal_grad_penalty: gradient_penalty with the labels as per-sample critic_args."""
    critic, score, real, fake, labels, alpha = _studio_setup()
    want = original_studio_gp(critic, real, fake, labels, alpha)
    want_grads = backward_grads(critic, 10.0 * want)
    got = gradpen.gradient_penalty(score, real, fake, alpha=alpha, critic_args=(labels,))
    assert_same(got, want)
    assert_same(backward_grads(critic, 10.0 * got), want_grads)


def test_studiogan_maxgrad_penalty():
    """StudioGAN cal_maxgrad_penalty: gradient_penalty(center=0, reduction='none').max()."""
    critic, score, real, fake, labels, alpha = _studio_setup()
    want = original_studio_maxgp(critic, real, fake, labels, alpha)
    want_grads = backward_grads(critic, want)
    got = gradpen.gradient_penalty(
        score, real, fake, center=0.0, alpha=alpha, critic_args=(labels,), reduction="none"
    ).max()
    assert_same(got, want)
    assert_same(backward_grads(critic, got), want_grads)


def test_studiogan_dra_penalty():
    """StudioGAN cal_dra_penalty: dragan_penalty with noise_scale 0.5 * sqrt(M / (M - 1)) (the sample std),
    at the same draws: gradpen's u, then alpha, and StudioGAN's alpha = 1 - gradpen's (same law)."""
    critic, score, real, _, labels, _ = _studio_setup()
    m = real.numel()
    gen = torch.Generator().manual_seed(5)
    u = torch.rand(real.shape, dtype=F64, generator=gen)  # the order gradpen draws them in
    alpha = torch.rand(N, dtype=F64, generator=gen)
    want = original_studio_dra(critic, real, labels, u, 1 - alpha)
    want_grads = backward_grads(critic, want)
    got = gradpen.dragan_penalty(
        score,
        real,
        noise_scale=0.5 * (m / (m - 1)) ** 0.5,
        generator=torch.Generator().manual_seed(5),
        critic_args=(labels,),
    )
    assert_same(got, want)
    assert_same(backward_grads(critic, got), want_grads)


def test_studiogan_r1_reg():
    """StudioGAN cal_r1_reg: 0.5 * gradient_norms_from(...).square().mean() from the loss's forward."""
    critic, _, real, _, labels, _ = _studio_setup()
    real_x = real.detach().requires_grad_(True)
    want = original_studio_r1(critic(augment(real_x), labels)["adv_output"], real_x)
    want_grads = backward_grads(critic, 10.0 * want)
    real_x = real.detach().requires_grad_(True)
    adv = critic(augment(real_x), labels)["adv_output"]
    got = 0.5 * gradpen.gradient_norms_from(adv, real_x).square().mean()
    assert_same(got, want)
    assert_same(backward_grads(critic, 10.0 * got), want_grads)


# --------------------------------------------------------------------------- minibatch std


def batch_sum_r1(critic, real):
    """StyleGAN2's R1 for a batch-coupled critic: row i is d(sum_j D(x)_j) / d x_i."""
    x = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return g.square().sum([1, 2, 3]).mean()


@pytest.mark.filterwarnings("ignore:The critic couples the samples")
def test_minibatch_std_autograd_is_the_batch_sum_r1():
    """With a minibatch-std layer, r1_penalty (autograd) and gradient_norms_from give the batch-sum R1."""
    critic, real = conv_critic(mbstd=True, group=4), images(N, 3, 8, 8, seed=1)
    want = batch_sum_r1(critic, real)
    want_grads = backward_grads(critic, want)
    got = gradpen.r1_penalty(critic, real)
    assert_same(got, want)
    assert_same(backward_grads(critic, got), want_grads)
    real_x = real.detach().requires_grad_(True)
    got = gradpen.gradient_norms_from(critic(real_x), real_x).square().mean()
    assert_same(got, want)
    assert_same(backward_grads(critic, got), want_grads)


def test_minibatch_std_per_sample_gradient_differs():
    """With a minibatch-std layer, sample i's own gradient d D(x)_i / d x_i (what a vmap gives) is not the
    batch-sum row d(sum_j D(x)_j) / d x_i: the two R1s differ (here by more than 1e-4 relative)."""
    critic, real = conv_critic(mbstd=True, group=4), images(N, 3, 8, 8, seed=1)
    jac = torch.autograd.functional.jacobian(lambda x: critic(x).squeeze(1), real)  # (N, N, 3, 8, 8)
    own = torch.stack([jac[i, i] for i in range(N)])
    rows = jac.sum(0)
    assert not torch.allclose(own, rows)
    torch.testing.assert_close(rows.square().sum([1, 2, 3]).mean(), batch_sum_r1(critic, real).detach(), **TOL)
    per_sample, batch_sum = own.square().sum([1, 2, 3]).mean(), rows.square().sum([1, 2, 3]).mean()
    assert abs(per_sample - batch_sum) > 1e-4 * batch_sum


def test_minibatch_std_layer_couples_only_its_group():
    """The test layer couples the samples of a group and no others (a sanity check of the layer itself)."""
    critic, real = conv_critic(mbstd=True, group=4), images(N, 3, 8, 8, seed=1)
    moved = real.clone()
    moved[0] += 1.0
    delta = (critic(moved) - critic(real)).squeeze(1).abs()
    groups = N // 4
    same_group = [i for i in range(1, N) if i % groups == 0]
    other = [i for i in range(1, N) if i % groups != 0]
    assert (delta[same_group] > 0).all()
    assert (delta[other] == 0).all()
