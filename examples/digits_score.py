"""An offline quality score for generated digits: no download, a small classifier trained on the real digits.

    python examples/digits_score.py --check            # the scorer on held-out real digits and on non-digits
    python examples/digits_score.py runs/digits/checkpoint.pt --num 1000

The classifier is an MLP (64-256-256-11) on scikit-learn's 8x8 digits with an eleventh class,
"not a digit", trained on non-digits made from the training digits: pixel-shuffled digits, noise,
and 40/60 to 60/40 blends of two digits of different classes (the smudges a weak generator makes).
It is trained on 1297 digits; 500 other digits (stratified, fixed seed) are held out to check it.

Generated images (N, 1, S, S) in [-1, 1] are average-pooled to 8x8 and scored:

- ``recognisable``: the share of samples the classifier puts in a digit class with probability
  >= ``THRESHOLD`` (0.9). The main number.
- ``min_class_share``: the smallest share of the 10 digit classes among the recognisable samples'
  labels, over all samples (a fair share is 0.1; it shows mode dropping).
- ``digits_is``: the Inception-Score formula with this classifier (digit classes), exp E KL(p(y|x) || p(y)), 1 to 10.
- ``fd``: the Frechet distance between the classifier's hidden features of generated and held-out real digits.

The same numbers for the 500 held-out real digits (pushed through the same resize and pooling as the
training images) are reported as ``real_*``; ``check()`` also scores non-digits, which must score near 0.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.nn import functional as F

THRESHOLD = 0.9  # top-class probability for a sample to count as recognisable
HELD_OUT = 500  # real digits kept out of the classifier's training set, to check it
NEGATIVES = 400  # non-digits of each kind in the training set (1297 real digits)
MIN_SAMPLES = 2  # the Frechet distance needs a covariance, which needs >= 2 samples (1 gives NaN, and sqrtm hangs)


def to8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (N, 1, S, S) -> (N, 64) in [0, 1] at the 8x8 resolution of the real digits."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    return F.adaptive_avg_pool2d(x, 8).flatten(1)


def _split(seed: int = 0):
    """The real digits (N, 64) in [0, 1] with labels, split into (train, held-out), stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=HELD_OUT, random_state=seed, stratify=y)
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)
    return (as_t(xtr, torch.float32), as_t(ytr, torch.long)), (as_t(xte, torch.float32), as_t(yte, torch.long))


def non_digits(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Three kinds of non-digits made from real digits (N, 64): shuffled pixels, noise, two-class blends."""
    n = len(x)
    shuffled = torch.stack([row[torch.randperm(64, generator=g)] for row in x])
    noise = torch.rand(n, 64, generator=g) * torch.rand(n, 1, generator=g)
    j = torch.randperm(n, generator=g)
    w = 0.4 + 0.2 * torch.rand(n, 1, generator=g)
    blends = (w * x + (1 - w) * x[j])[y != y[j]]
    return {"shuffled": shuffled, "noise": noise, "blends": blends}


@lru_cache(maxsize=1)
def train_classifier(seed: int = 0, steps: int = 6000, batch: int = 128) -> nn.Module:
    """The 11-class MLP (10 digits + "not a digit"), Adam on minibatches (~300 epochs); seconds on a CPU."""
    (xtr, ytr), _ = _split(seed)
    with torch.random.fork_rng(), torch.enable_grad():  # also when called under no_grad
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        kinds = non_digits(xtr, ytr, g).values()
        negatives = torch.cat([v[torch.randperm(len(v), generator=g)[:NEGATIVES]] for v in kinds])
        x = torch.cat([xtr, negatives])
        y = torch.cat([ytr, torch.full((len(negatives),), 10)])
        clf = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 11))
        opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(steps):
            i = torch.randint(len(x), (batch,), generator=g)
            opt.zero_grad()
            F.cross_entropy(clf(x[i]), y[i]).backward()
            opt.step()
    return clf.eval().requires_grad_(False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # dead ReLU features make the covariances singular; sqrtm still converges
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def _stats(clf: nn.Module, x8: torch.Tensor) -> tuple[dict[str, float], np.ndarray, torch.Tensor]:
    with torch.no_grad():
        feats = clf[:4](x8)
        p = clf[4](feats).softmax(1)
    top, label = p.max(1)
    ok = (top >= THRESHOLD) & (label < 10)
    share = torch.bincount(label[ok], minlength=11)[:10].float() / len(p)
    pd = p[:, :10] / p[:, :10].sum(1, keepdim=True)  # the digit classes only, for the IS formula
    marginal = pd.mean(0, keepdim=True)
    kl = (pd * (pd.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1).mean()
    stats = {
        "recognisable": float(ok.float().mean()),
        "min_class_share": float(share.min()),
        "digits_is": float(kl.exp()),
    }
    return stats, feats.double().numpy(), label


def score(fake: torch.Tensor, image_size: int | None = None) -> dict[str, float]:
    """Scores of ``fake`` (N, 1, S, S) in [-1, 1], beside those of the held-out real digits.

    The held-out real digits are resized to ``image_size`` (default: S) the way the trainer resizes
    them, then pooled back to 8x8 like the samples, so both go through the same resolution change.
    """
    if fake.dim() != 4 or fake.shape[1] != 1 or fake.shape[2] != fake.shape[3] or fake.shape[-1] < 8:
        raise ValueError(
            f"`fake` must be 1-channel square images (N, 1, S, S) with S >= 8 (the classifier reads 8x8 digits); "
            f"got shape {tuple(fake.shape)}."
        )
    if len(fake) < MIN_SAMPLES:
        raise ValueError(
            f"`fake` must hold >= {MIN_SAMPLES} samples (the Frechet distance needs their covariance); got {len(fake)}."
        )
    clf = train_classifier()
    _, (xte, yte) = _split()
    size = image_size or fake.shape[-1]
    real = F.interpolate(xte.view(-1, 1, 8, 8), size=size, mode="bilinear", align_corners=False)
    real = ((real.clamp(0, 1) * 255).round() / 127.5 - 1) if size != 8 else real * 2 - 1  # the trainer's uint8 step
    fake_stats, fake_feats, _ = _stats(clf, to8(fake))
    real_stats, real_feats, real_label = _stats(clf, to8(real))
    out: dict[str, float] = {**fake_stats, "fd": frechet_distance(fake_feats, real_feats)}
    out.update({f"real_{k}": v for k, v in real_stats.items()})
    out["real_accuracy"] = float((real_label == yte).float().mean())
    return out


def check() -> dict[str, float]:
    """The scorer on what it must accept (held-out real digits) and what it must reject (held-out non-digits)."""
    clf = train_classifier()
    _, (xte, yte) = _split()
    out = {}
    stats, _, label = _stats(clf, xte)
    out["real_recognisable"], out["real_accuracy"] = stats["recognisable"], float((label == yte).float().mean())
    for name, x in non_digits(xte, yte, torch.Generator().manual_seed(1)).items():
        out[f"{name}_recognisable"] = _stats(clf, x)[0]["recognisable"]
    return out


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line that names the flag (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    p = OneLineParser(prog="digits_score.py", description="Score generated digits offline.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint.pt of a --dataset digits run")
    p.add_argument("--num", type=int, default=1000, help="samples to score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="score held-out real digits and non-digits instead")
    args = p.parse_args(argv)
    if not args.check and args.num < MIN_SAMPLES:
        why = "the Frechet distance needs a covariance of the samples"
        p.error(f"--num must be >= {MIN_SAMPLES} ({why}), got {args.num}")
    if args.check:
        result = check()
    elif args.checkpoint:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import generate

        torch.manual_seed(args.seed)
        gen, _ = generate.load_generator(args.checkpoint, "cpu", use_ema=True)
        with torch.no_grad():
            fake = gen(torch.randn(args.num, generate.models.Z_DIM))
        if fake.shape[1] != 1 or fake.shape[-1] < 8:
            size = "x".join(map(str, fake.shape[2:]))
            p.error(
                f"checkpoint {args.checkpoint!r} makes {fake.shape[1]}-channel {size} images; the digits scorer "
                "scores 1-channel images of >= 8x8 (a --dataset digits run)"
            )
        result = score(fake)
    else:
        p.error("give a checkpoint or --check")
    print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
