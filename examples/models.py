"""The WGAN-GP paper's CIFAR-10 networks, in PyTorch, and a small pair for 8x8 digits.

- ``resnet``: ``gan_cifar_resnet.py`` of the official code (Gulrajani et al. 2017, Appendix F):
  BatchNorm in the generator only, no normalisation in the critic.
- ``dcgan``: the DCGAN-like ``gan_cifar.py``: BatchNorm in the generator only, LeakyReLU(0.2) critic.
- ``mlp``: not from the paper; two-hidden-layer MLPs for scikit-learn's 8x8 digits at their own
  size, the default of ``train_cifar.py --dataset digits`` (about 30x cheaper per step than ``dcgan``).
- ``ViTCritic`` (``train_cifar.py --critic vit``): not from the paper; a small vision-transformer critic
  (pre-norm blocks, LayerNorm, attention through ``F.scaled_dot_product_attention``, no BatchNorm), to
  pair with any generator.

``resnet`` and ``dcgan`` take ``image_size`` 32 (the paper) or 64 (one more up/down-sampling stage),
``mlp`` 8 or 16 (``IMAGE_SIZES``); all take ``channels`` (3 for RGB, 1 for digits). Weights use
PyTorch's default init; the official code uses He/Glorot uniform init, which changes nothing we measured.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

Z_DIM = 128  # latent size of both official scripts


def _stages(image_size: int) -> int:
    if image_size not in (32, 64):
        raise ValueError(f"image_size must be 32 or 64, got {image_size}")
    return int(math.log2(image_size // 4))  # 4x4 -> image_size by doubling


class ConvMeanPool(nn.Conv2d):
    """Conv, then 2x2 mean pool (official ``ConvMeanPool``)."""

    def forward(self, x):
        return F.avg_pool2d(super().forward(x), 2)


class MeanPoolConv(nn.Conv2d):
    """2x2 mean pool, then conv (official ``MeanPoolConv``)."""

    def forward(self, x):
        return super().forward(F.avg_pool2d(x, 2))


class UpsampleConv(nn.Conv2d):
    """Nearest 2x upsampling, then conv: the official depth_to_space of four copies is exactly this."""

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResidualBlock(nn.Module):
    """norm -> ReLU -> conv -> norm -> ReLU -> conv, plus a (1x1 conv) shortcut; resample None/'up'/'down'."""

    def __init__(self, cin: int, cout: int, resample: str | None, norm: bool):
        super().__init__()
        if resample == "down":
            self.conv1, self.conv2 = nn.Conv2d(cin, cin, 3, padding=1), ConvMeanPool(cin, cout, 3, padding=1)
            self.shortcut: nn.Module = ConvMeanPool(cin, cout, 1)
        elif resample == "up":
            self.conv1, self.conv2 = UpsampleConv(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
            self.shortcut = UpsampleConv(cin, cout, 1)
        else:
            self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
            self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        mid = cin if resample == "down" else cout  # channels after conv1
        self.norm1 = nn.BatchNorm2d(cin) if norm else nn.Identity()
        self.norm2 = nn.BatchNorm2d(mid) if norm else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)))
        return self.shortcut(x) + self.conv2(F.relu(self.norm2(h)))


class OptimizedDiscBlock(nn.Module):
    """The critic's first block: conv -> ReLU -> ConvMeanPool, shortcut MeanPoolConv (no ReLU on the image)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), ConvMeanPool(cout, cout, 3, padding=1)
        self.shortcut = MeanPoolConv(cin, cout, 1)

    def forward(self, x):
        return self.shortcut(x) + self.conv2(F.relu(self.conv1(x)))


class ResNetGenerator(nn.Module):
    def __init__(self, dim: int = 128, image_size: int = 32, channels: int = 3):
        super().__init__()
        self.dim = dim
        self.input = nn.Linear(Z_DIM, 4 * 4 * dim)
        self.blocks = nn.Sequential(*[ResidualBlock(dim, dim, "up", norm=True) for _ in range(_stages(image_size))])
        self.out_norm = nn.BatchNorm2d(dim)
        self.output = nn.Conv2d(dim, channels, 3, padding=1)

    def forward(self, z):
        x = self.blocks(self.input(z).view(-1, self.dim, 4, 4))
        return torch.tanh(self.output(F.relu(self.out_norm(x))))


class ResNetCritic(nn.Module):
    def __init__(self, dim: int = 128, image_size: int = 32, channels: int = 3):
        super().__init__()
        downs = _stages(image_size) - 2  # 32x32: optimized block (->16) and one down block (->8)
        self.blocks = nn.Sequential(
            OptimizedDiscBlock(channels, dim),
            *[ResidualBlock(dim, dim, "down", norm=False) for _ in range(downs)],
            ResidualBlock(dim, dim, None, norm=False),
            ResidualBlock(dim, dim, None, norm=False),
        )
        self.output = nn.Linear(dim, 1)

    def forward(self, x):
        return self.output(F.relu(self.blocks(x)).mean((2, 3))).squeeze(1)


class DCGANGenerator(nn.Module):
    def __init__(self, dim: int = 128, image_size: int = 32, channels: int = 3):
        super().__init__()
        n = _stages(image_size)
        self.top = 2 ** (n - 1) * dim
        self.input = nn.Sequential(nn.Linear(Z_DIM, 4 * 4 * self.top), nn.BatchNorm1d(4 * 4 * self.top), nn.ReLU())
        layers: list[nn.Module] = []
        c = self.top
        for _ in range(n - 1):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 5, 2, padding=2, output_padding=1),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(),
            ]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 5, 2, padding=2, output_padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z):
        return self.body(self.input(z).view(-1, self.top, 4, 4))


class DCGANCritic(nn.Module):
    def __init__(self, dim: int = 128, image_size: int = 32, channels: int = 3):
        super().__init__()
        n = _stages(image_size)
        layers: list[nn.Module] = []
        c_in, c = channels, dim
        for _ in range(n):
            layers += [nn.Conv2d(c_in, c, 5, 2, padding=2), nn.LeakyReLU(0.2)]
            c_in, c = c, 2 * c
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 4 * c_in, 1))

    def forward(self, x):
        return self.body(x).squeeze(1)


class MLPGenerator(nn.Module):
    """z -> 4d -> 4d -> C*S*S, BatchNorm and ReLU between, tanh out: for the 8x8 digits at their own size."""

    def __init__(self, dim: int = 64, image_size: int = 8, channels: int = 1):
        super().__init__()
        if image_size not in (8, 16):
            raise ValueError(f"image_size must be 8 or 16 for the mlp networks, got {image_size}")
        self.shape = (channels, image_size, image_size)
        h = 4 * dim
        self.body = nn.Sequential(
            nn.Linear(Z_DIM, h), nn.BatchNorm1d(h), nn.ReLU(),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
            nn.Linear(h, math.prod(self.shape)), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z):
        return self.body(z).view(-1, *self.shape)


class MLPCritic(nn.Module):
    """C*S*S -> 4d -> 4d -> 1 with LeakyReLU(0.2), no normalisation."""

    def __init__(self, dim: int = 64, image_size: int = 8, channels: int = 1):
        super().__init__()
        if image_size not in (8, 16):
            raise ValueError(f"image_size must be 8 or 16 for the mlp networks, got {image_size}")
        h = 4 * dim
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * image_size**2, h), nn.LeakyReLU(0.2),
            nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x).squeeze(1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); attention through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # The kernel is chosen here, at forward time: gradpen's exact penalties run this under MATH,
        # the only kernel with a double backward; the approx estimators and the plain loss use the default.
        a = F.scaled_dot_product_attention(q, k, v)  # (n, heads, t, w / heads)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, w))
        return x + self.mlp(self.norm2(x))


class ViTCritic(nn.Module):
    """Patches -> linear embedding + learnt positions -> pre-norm blocks -> LayerNorm -> mean over tokens -> score.

    Patches of ``patch`` pixels (0: ``max(2, image_size // 8)``, so 16 tokens at 8x8, 64 at 16, 32 and
    64); width ``dim``, 4 heads, ``depth`` blocks (default 3), MLP width ``2 * dim``, GELU. No BatchNorm
    and no dropout, so the samples of a batch never interact (what the per-sample penalties need) and the
    approx estimators can run one fused forward over their perturbed copies. Smooth (GELU, LayerNorm), so
    ``backend="fd"`` applies.
    """

    def __init__(
        self, dim: int = 64, image_size: int = 8, channels: int = 1, depth: int = 3, heads: int = 4, patch: int = 0
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads={heads} for the vit critic, got {dim}")
        patch = patch or max(2, image_size // 8)
        if image_size % patch:
            raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}")
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)  # one linear map per patch
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, 1)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, T, dim)
        # (N, 1) -> (N,) by a sum, not squeeze: FSDP2 warns when a module returns a view (in-place ops on it)
        return self.output(self.norm(self.blocks(tokens)).mean(1)).sum(1)


ARCHS = {
    "resnet": (ResNetGenerator, ResNetCritic),
    "dcgan": (DCGANGenerator, DCGANCritic),
    "mlp": (MLPGenerator, MLPCritic),
}
IMAGE_SIZES = {"resnet": (32, 64), "dcgan": (32, 64), "mlp": (8, 16)}  # what each pair supports
CRITICS = {"arch": None, "vit": ViTCritic}  # --critic: the critic of --arch, or one that replaces it


def build(
    arch: str, dim: int, image_size: int, channels: int, critic: str = "arch", vit_depth: int = 3, vit_patch: int = 0
) -> tuple[nn.Module, nn.Module]:
    """The (generator, critic) pair of ``arch``; ``critic="vit"`` replaces its critic by :class:`ViTCritic`
    (``vit_depth`` blocks, patches of ``vit_patch`` pixels, 0 for its default)."""
    gen_cls, critic_cls = ARCHS[arch]
    if critic == "vit":
        return gen_cls(dim, image_size, channels), ViTCritic(dim, image_size, channels, vit_depth, patch=vit_patch)
    return gen_cls(dim, image_size, channels), critic_cls(dim, image_size, channels)
