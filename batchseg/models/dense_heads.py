"""Training-free dense CLIP heads, computed at label time from the stored last-block tokens.

``embed`` stores what every head needs (:class:`ClipTokens`): for ViT towers the
last transformer block's *input* tokens (patch grid and class token), for CNN towers
the last feature map. A head is a function of those tokens and the tower's last
block, ``ln_post`` and ``proj``, so choosing another head never needs re-embedding.

ViT heads (``x`` = the last block's input, ``q, k, v`` = the block's ``in_proj`` of
``ln_1(x)`` split per attention head, ``s`` = head_dim^-1/2; attention runs over the
class token and the patches, as the official code does; only patch outputs are kept):

=============  =====================================================  ==================
head           attention                                              residual + FFN
=============  =====================================================  ==================
``maskclip``   none (value path: the diagonal)                        kept (official)
``value``      none (value path)                                      dropped
``clearclip``  ``softmax(s q q^T)``                                   dropped
``sclip``      ``softmax(s q q^T) + softmax(s k k^T)``                kept
``naclip``     ``softmax(s k k^T + omega)``, omega a Gaussian window  dropped
               (std 5 patches) over patch-patch pairs, 0 for the
               class token
``proxy-sam``  one attention for all heads from the stored SAM        dropped
               embedding (ProxyCLIP): ``S = cos(f_i, f_j)``,
               ``S <- gamma (S - beta mean(S))``, ``S < 0 -> -inf``,
               row softmax; CLIP values bilinearly upsampled to SAM's
               grid
=============  =====================================================  ==================

then ``out_proj``, ``ln_post`` and ``proj``. ResNet towers: ``maskclip`` (= ``value``)
is ``c_proj(v_proj(f))``; ``proxy-sam`` attends ``v_proj(f)`` with SAM's attention,
then ``c_proj``. timm (ConvNeXt) towers: ``maskclip`` applies the tower's head at every
location of the stored feature map; ``proxy-sam`` mixes the (upsampled) feature map with
SAM's attention first. Keys for key smoothing are ``out_proj(k)`` (ViT), ``k_proj(f)``
(ResNet) or the feature map (timm), on the head's output grid.

``proxy-sam`` geometry: ProxyCLIP crops the image into sliding windows and runs the
proxy model on each crop at CLIP's resolution; batchseg uses the one whole-image SAM
embedding stored by ``embed`` (a 64 x 64 grid on SAM's 1024 canvas), average-pooled to
at most ``proxy_grid`` (32) per side to bound the attention's cost. Both canvases hold
the same top-left letterboxed image, so CLIP's grid resized to that grid lines up cell
for cell, and the head's output lives there (finer than CLIP's 14 x 14).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from batchseg.models.specs import (  # noqa: F401  (torch-free home; re-exported)
    SAM_HEADS,
    VIT_ONLY_HEADS,
    DenseHeadSettings,
    check_head_supported,
)

if TYPE_CHECKING:
    from batchseg.models.clip import DenseClip

class ClipTokens(NamedTuple):
    """What ``embed`` stores per image for the dense heads (any float dtype).

    tokens: (B, W, g, g) ViT: the last block's input patch tokens (W = width);
        CNN: the last feature map (W = its channels).
    cls: (B, W) the class token at the last block's input (ViT), ``None`` for CNN towers.
    global_: (B, D) the model's own image embedding (== ``model.encode_image``).
    """

    tokens: Tensor
    cls: Tensor | None
    global_: Tensor


class HeadOutput(NamedTuple):
    """dense: (B, D, h, w) float32 features in the joint image-text space.
    keys: (B, K, h, w) float32 last-block keys on the same grid (for key smoothing).
    (h, w) is CLIP's grid, or SAM's grid for ``proxy-sam``."""

    dense: Tensor
    keys: Tensor


def compute_head(
    clip: "DenseClip", settings: DenseHeadSettings, tokens: Tensor, cls: Tensor | None = None,
    sam: Tensor | None = None,
) -> HeadOutput:
    """Dense features of head ``settings.name`` from stored tokens.

    Args:
        clip: the build's CLIP (only its last block, ``ln_post``, ``proj`` or the
            attention pool's projections are used).
        tokens: (B, W, g, g) as stored, any float dtype (computed in float32).
        cls: (B, W) stored class token (ViT heads with attention need it).
        sam: (B, Cs, G, G) stored SAM embedding (``proxy-sam`` only).
    """
    check_head_supported(settings, clip.kind, sam is not None or not settings.needs_sam)
    visual = clip.model.visual
    dtype = _weight_dtype(clip)
    tokens = tokens.to(dtype)
    if clip.kind == "timm":
        from batchseg.models.clip_timm import timm_head  # the CNN (timm) tower's own projection

        if settings.name == "proxy-sam":  # attend the feature map with SAM's attention, then project
            size = tuple(sam.shape[-2:])
            weights = proxy_attention(sam, settings.proxy_beta, settings.proxy_gamma)
            mixed = weights.to(tokens.dtype) @ _to_seq(_upsample(tokens, size))
            return _float(timm_head(visual, _to_grid(mixed, *size)))
        return _float(timm_head(visual, tokens))
    if clip.kind == "resnet":
        return _float(_resnet_head(visual, settings, tokens, sam))
    if sam is not None and settings.needs_sam and sam.shape[-1] > settings.proxy_grid:
        sam = F.adaptive_avg_pool2d(sam.float(), settings.proxy_grid)
    if cls is None and settings.name in ("clearclip", "sclip", "naclip"):
        raise ValueError(f"dense head {settings.name!r} needs the stored class token")
    return _float(_vit_head(visual, settings, tokens, None if cls is None else cls.to(dtype), sam))


def _weight_dtype(clip: "DenseClip") -> torch.dtype:
    return next(clip.model.visual.parameters()).dtype


def _float(out: HeadOutput) -> HeadOutput:
    return HeadOutput(out.dense.float(), out.keys.float())


def _to_seq(grid: Tensor) -> Tensor:
    return grid.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), row-major


def _to_grid(seq: Tensor, h: int, w: int) -> Tensor:
    return seq.transpose(1, 2).reshape(seq.shape[0], -1, h, w)


def _vit_head(visual, settings: DenseHeadSettings, tokens: Tensor, cls: Tensor | None, sam: Tensor | None) -> HeadOutput:
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    b, width, gh, gw = tokens.shape
    patches = _to_seq(tokens)  # (B, g*g, W)
    name = settings.name
    with_cls = cls is not None and name in ("clearclip", "sclip", "naclip")
    x = torch.cat([cls[:, None], patches], dim=1) if with_cls else patches
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    keys = _to_grid(attn.out_proj(k[:, -gh * gw :]), gh, gw)
    heads = attn.num_heads
    if name in ("maskclip", "value"):
        attended = attn.out_proj(v)
    elif name == "proxy-sam":
        return _proxy_sam_vit(visual, settings, v, keys, sam, gh, gw)
    else:
        qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
        scale = qh.shape[-1] ** -0.5
        if name == "clearclip":
            weights = torch.softmax(qh @ qh.transpose(-1, -2) * scale, dim=-1)
        elif name == "sclip":
            weights = torch.softmax(qh @ qh.transpose(-1, -2) * scale, dim=-1) + torch.softmax(
                kh @ kh.transpose(-1, -2) * scale, dim=-1)
        else:  # naclip
            omega = neighbourhood_bias(gh, gw, settings.naclip_std, with_cls).to(kh)
            weights = torch.softmax(kh @ kh.transpose(-1, -2) * scale + omega, dim=-1)
        attended = attn.out_proj(_merge_heads(weights @ vh))
    if name in ("maskclip", "sclip"):  # the block's residual and MLP, as the official code keeps them
        t = x + block.ls_1(attended)
        t = t + block.ls_2(block.mlp(block.ln_2(t)))
    else:
        t = attended
    dense = visual.ln_post(t[:, -gh * gw :]) @ visual.proj
    return HeadOutput(_to_grid(dense, gh, gw), keys)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    b, length, width = t.shape
    return t.reshape(b, length, heads, width // heads).transpose(1, 2)  # (B, heads, L, hd)


def _merge_heads(t: Tensor) -> Tensor:
    b, heads, length, hd = t.shape
    return t.transpose(1, 2).reshape(b, length, heads * hd)


def neighbourhood_bias(gh: int, gw: int, std: float, with_cls: bool) -> Tensor:
    """NACLIP's additive attention bias: ``exp(-d^2 / (2 std^2))`` between patches.

    Returns float32 (L, L), L = gh*gw (+1 with the class token, whose row and column
    are 0). d is the distance between two patches in patch units, row-major order.
    """
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    bias = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * std * std))
    if with_cls:
        bias = F.pad(bias, (1, 0, 1, 0))
    return bias


def proxy_attention(sam: Tensor, beta: float, gamma: float) -> Tensor:
    """ProxyCLIP's attention from proxy features.

    Args:
        sam: (B, Cs, G, G) float proxy (SAM) features.
    Returns:
        float32 (B, G*G, G*G) row-stochastic weights: cosine similarities ``S``,
        ``gamma * (S - beta * mean(S))`` (mean over each image's matrix), negatives
        masked out, softmax over each row. The diagonal (S = 1) is always kept, so a
        row is never empty.
    """
    f = F.normalize(_to_seq(sam.float()), dim=-1)  # (B, N, Cs)
    s = f @ f.transpose(1, 2)
    s = gamma * (s - beta * s.mean(dim=(1, 2), keepdim=True))
    eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    s = s.masked_fill((s < 0) & ~eye, float("-inf"))
    return torch.softmax(s, dim=-1)


def _upsample(grid: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False).to(grid.dtype)


def _proxy_sam_vit(visual, settings: DenseHeadSettings, v: Tensor, keys: Tensor, sam: Tensor | None,
                   gh: int, gw: int) -> HeadOutput:
    assert sam is not None
    attn = visual.transformer.resblocks[-1].attn
    size = tuple(sam.shape[-2:])
    values = _to_seq(_upsample(_to_grid(v[:, -gh * gw :], gh, gw), size))  # (B, G*G, W)
    weights = proxy_attention(sam, settings.proxy_beta, settings.proxy_gamma).to(values.dtype)
    dense = visual.ln_post(attn.out_proj(weights @ values)) @ visual.proj
    return HeadOutput(_to_grid(dense, *size), _upsample(keys, size))


def _resnet_head(visual, settings: DenseHeadSettings, tokens: Tensor, sam: Tensor | None) -> HeadOutput:
    pool = visual.attnpool
    gh, gw = tokens.shape[-2:]
    f = _to_seq(tokens)
    keys = _to_grid(pool.k_proj(f), gh, gw)
    values = pool.v_proj(f)
    if settings.name != "proxy-sam":  # maskclip == value for ResNet: c_proj(v_proj(f))
        return HeadOutput(_to_grid(pool.c_proj(values), gh, gw), keys)
    size = tuple(sam.shape[-2:])
    values = _to_seq(_upsample(_to_grid(values, gh, gw), size))
    weights = proxy_attention(sam, settings.proxy_beta, settings.proxy_gamma).to(values.dtype)
    return HeadOutput(_to_grid(pool.c_proj(weights @ values), *size), _upsample(keys, size))
