"""An offline quality score for generated digits: no download, a small classifier trained on the real digits.

For generated 32x32 digits (pooled back to scikit-learn's 8x8) it reports:

- ``digits_is``: the Inception-Score formula with this classifier, exp E_x KL(p(y|x) || p(y)), from 1 to 10;
- ``confidence``: the mean top-class probability (are the samples recognisable?);
- ``classes_covered``: classes that receive at least 2.5% of the samples (a quarter of a fair share);
- ``fd``: the Frechet distance between the classifier's hidden features of generated and real digits.

The same numbers on the real training digits are reported beside them (``real_*``) as the ceiling.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.nn import functional as F


def _to8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (N, 1, S, S) -> (N, 64) in [0, 1] at the 8x8 resolution of the real digits."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    return F.adaptive_avg_pool2d(x, 8).flatten(1)


def train_classifier(seed: int = 0, steps: int = 400) -> tuple[nn.Module, float]:
    """A 64-128-10 MLP on scikit-learn's digits (1797 images); returns it and its held-out accuracy."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    test, train = perm[:300], perm[300:]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = torch.optim.Adam(clf.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(clf(x[train]), y[train]).backward()
            opt.step()
    clf.eval().requires_grad_(False)
    acc = (clf(x[test]).argmax(1) == y[test]).float().mean().item()
    return clf, acc


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # dead ReLU features make the covariances singular; sqrtm still converges
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def _stats(clf: nn.Module, x8: torch.Tensor) -> tuple[dict[str, float], np.ndarray]:
    feats = clf[1](clf[0](x8))
    p = clf[2](feats).softmax(1)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (p.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1).mean()
    share = torch.bincount(p.argmax(1), minlength=10).float() / len(p)
    return {
        "digits_is": float(kl.exp()),
        "confidence": float(p.max(1).values.mean()),
        "classes_covered": int((share >= 0.025).sum()),
    }, feats.double().numpy()


def score(fake: torch.Tensor, real_uint8: torch.Tensor) -> dict[str, float]:
    """Quality of ``fake`` (N, 1, S, S) in [-1, 1] against the real digits (uint8, (M, 1, S, S))."""
    clf, acc = train_classifier()
    real = real_uint8.float() / 127.5 - 1
    with torch.no_grad():
        fake_stats, fake_feats = _stats(clf, _to8(fake))
        real_stats, real_feats = _stats(clf, _to8(real))
    half = len(real_feats) // 2
    out: dict[str, float] = {**fake_stats, "fd": frechet_distance(fake_feats, real_feats)}
    out.update({f"real_{k}": v for k, v in real_stats.items()})
    out["real_fd_halves"] = frechet_distance(real_feats[:half], real_feats[half:])
    out["classifier_acc"] = acc
    return out
