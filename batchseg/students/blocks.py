"""Token mixers and blocks of the students' backbones.

Every block is a MetaFormer-style residual pair on a ``(B, C, H, W)`` feature map::

    x = x + mixer(norm(x));  x = x + mlp(norm(x))

and only the mixer differs between ``--blocks`` choices, so they compare at (nearly)
equal parameter count (about ``4 C^2`` per mixer, see :func:`mixer_parameters`):

* ``conv``: point-wise 1x1 (C -> 2C), depth-wise 3x3, point-wise 1x1 (2C -> C).
* ``attention``: multi-head softmax self-attention over the ``H*W`` tokens.
* ``dynamic``: the attention of "Interpret Vision Transformers as ConvNets with
  Dynamic Convolutions" (Zhou et al. 2023): the attention matrix is a dynamic
  convolution kernel; softmax is replaced by ReLU, the kernel is scaled by the
  number of tokens, and a LayerNorm over channels follows (the normalisation that
  softmax gave). ``dynamic-dw`` is its depth-wise variant: one kernel per channel
  (as many heads as channels, head dimension 1), like a depth-wise convolution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchseg.students.settings import BLOCK_KINDS  # noqa: F401  (torch-free home; re-exported)


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm(1, C) is LayerNorm over (C, H, W): no batch statistics, so a batch of
    # one image and an exported model behave as in training.
    return nn.GroupNorm(1, channels)


class ConvMixer(nn.Module):
    """Point-wise, depth-wise 3x3, point-wise: the convolutional baseline."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(dim, 2 * dim, 1)
        self.spatial = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim)
        self.project = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(F.gelu(self.spatial(self.expand(x))))


class AttentionMixer(nn.Module):
    """Multi-head self-attention over all ``H*W`` positions of a ``(B, C, H, W)`` map.

    ``relu_norm=False``: softmax attention. ``relu_norm=True``: the dynamic-convolution
    form, ``LN(ReLU(q k^T / sqrt(d)) v / N)`` with ``N`` tokens and LN over channels.
    ``heads=dim`` makes the depth-wise variant (head dimension 1).
    """

    def __init__(self, dim: int, heads: int, relu_norm: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.relu_norm = relu_norm
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.project = nn.Conv2d(dim, dim, 1)
        self.out_norm = nn.LayerNorm(dim) if relu_norm else None

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = h * w
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, n).unbind(1)  # (B, heads, d, N) each
        scale = 1.0 / math.sqrt(c // self.heads)
        logits = torch.einsum("bhdn,bhdm->bhnm", q, k) * scale  # (B, heads, N, N)
        if self.relu_norm:
            weights = F.relu(logits) / n
        else:
            weights = logits.softmax(dim=-1)
        out = torch.einsum("bhnm,bhdm->bhdn", weights, v).reshape(b, c, n)
        if self.out_norm is not None:
            out = self.out_norm(out.transpose(1, 2)).transpose(1, 2)
        return self.project(out.reshape(b, c, h, w))


def make_mixer(kind: str, dim: int, heads: int) -> nn.Module:
    if kind == "conv":
        return ConvMixer(dim)
    if kind == "attention":
        return AttentionMixer(dim, heads)
    if kind == "dynamic":
        return AttentionMixer(dim, heads, relu_norm=True)
    if kind == "dynamic-dw":
        return AttentionMixer(dim, dim, relu_norm=True)
    raise ValueError(f"unknown block kind {kind!r}; choose one of {', '.join(BLOCK_KINDS)}")


def mixer_parameters(kind: str, dim: int, heads: int = 4) -> int:
    return sum(p.numel() for p in make_mixer(kind, dim, heads).parameters())


class Block(nn.Module):
    """One residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; shape kept."""

    def __init__(self, kind: str, dim: int, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = _norm(dim)
        self.mixer = make_mixer(kind, dim, heads)
        self.norm2 = _norm(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, mlp_ratio * dim, 1), nn.GELU(), nn.Conv2d(mlp_ratio * dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Backbone(nn.Module):
    """A compact stride-8 backbone: a convolutional stem (strides 2, 2, 2) then ``depth`` blocks.

    Input ``(B, 3, S, S)`` float (normalised pixels); output ``(B, width, S/8, S/8)``
    and, for the instance student, the stride-4 stem feature ``(B, width/2, S/4, S/4)``.
    Random initialisation only: nothing is downloaded.
    """

    def __init__(self, kind: str, width: int = 64, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        half = width // 2
        self.stem4 = nn.Sequential(
            nn.Conv2d(3, half // 2, 3, stride=2, padding=1), _norm(half // 2), nn.GELU(),
            nn.Conv2d(half // 2, half, 3, stride=2, padding=1), _norm(half), nn.GELU(),
        )
        self.down8 = nn.Sequential(nn.Conv2d(half, width, 3, stride=2, padding=1), _norm(width), nn.GELU())
        self.blocks = nn.Sequential(*(Block(kind, width, heads) for _ in range(depth)))
        self.width = width

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(stride-8 features (B, width, S/8, S/8), stride-4 features (B, width/2, S/4, S/4))``."""
        f4 = self.stem4(pixels)
        return self.blocks(self.down8(f4)), f4
