"""Plain PyTorch architectures specdef can rebuild from a name and kwargs (no pickles, no code in
checkpoints): an MLP, a small CNN and a small ViT. Hugging Face models are rebuilt from their
``config.json`` instead (see :mod:`specdef.io.checkpoint`).

Every linear map is a stock ``nn.Linear`` (the ViT writes attention by hand instead of using
``nn.MultiheadAttention``, whose fused input projection is a bare parameter, and so that double
backward, which Hessian-vector products need, works on CPU).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from specdef.errors import SpecdefError, did_you_mean

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise SpecdefError(did_you_mean(name, _ACTIVATIONS, what="activation"))
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """``in_features → hidden[0] → … → out_features`` with an activation between linear layers.

    Input ``(batch, in_features)`` or images ``(batch, C, H, W)`` (flattened); output logits.
    Linear layers are named ``layers.0``, ``layers.2``, …
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (64, 64),
        out_features: int = 10,
        *,
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, out_features]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            modules.append(nn.Linear(a, b, bias=bias))
            if i < len(widths) - 2:
                modules.append(_activation(activation))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


class SmallCNN(nn.Module):
    """Two 3×3 conv blocks (conv → ReLU → 2×2 max-pool) and a linear head. Input ``(B, C, H, W)``."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: Sequence[int] = (16, 32),
        num_classes: int = 10,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            side = math.isqrt(x.shape[1])
            x = x.view(x.shape[0], 1, side, side)
        return self.head(self.act(self.fc1(self.features(x).flatten(1))))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise SpecdefError(
                f"ViT dim {dim} must be divisible by heads {heads}; change one of them."
            )
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.down_proj(self.act(self.up_proj(self.norm2(x))))


class SmallViT(nn.Module):
    """A small vision transformer: patch embedding, ``depth`` pre-norm blocks, mean-pool, head."""

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise SpecdefError(
                f"ViT image_size {image_size} must be a multiple of patch_size {patch_size}."
            )
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, n_patches, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        s, p, c = self.image_size, self.patch_size, self.in_channels
        x = (
            x.reshape(b, c, s // p, p, s // p, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, -1, c * p * p)
        )
        x = self.patch_embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "vit": SmallViT,
}


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build an untrained model of a registered architecture (weights are loaded separately)."""
    if name not in ARCHITECTURES:
        raise SpecdefError(did_you_mean(name, ARCHITECTURES, what="architecture"))
    model = ARCHITECTURES[name](**kwargs)
    # the spec specdef.io.checkpoint stores beside the weights to rebuild the model without pickles
    setattr(model, "specdef_architecture", {"name": name, "kwargs": dict(kwargs)})  # noqa: B010
    return model
