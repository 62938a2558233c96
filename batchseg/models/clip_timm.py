"""Dense CLIP features for open_clip's timm image towers (``open_clip.timm_model.TimmModel``),
e.g. the ConvNeXt CLIPs (``convnext_base``, ``convnext_large_d``, ...).

Kept apart from :mod:`batchseg.models.clip` (which owns loading, the ViT path and
the public API) so each file stays readable. Only :class:`batchseg.models.clip.DenseClip`
should call these functions.

A timm tower computes ``global = head(trunk.forward_head(trunk.forward_features(x)))``:
the trunk's last feature map f (B, C, h, w), the trunk's head (for ConvNeXt: global
average pool, LayerNorm, optional pre-logits MLP, optional classifier) and open_clip's
adapter head (``proj``: a Linear or an MLP). The dense form is the whole head applied
at each location of f on its own, i.e. to a 1x1 map, so the pool is the identity:

    dense[:, :, y, x] = head(trunk.forward_head(f[:, :, y:y+1, x:x+1])),    keys = f.

For a ConvNeXt CLIP this is ``proj(LayerNorm(f[y, x]))``: the per-location use of a
frozen ConvNeXt CLIP that FC-CLIP makes (its ``visual_prediction_forward_convnext``
applies the trunk head's norm and the projection to each location of the last map).
Because average pooling commutes with every *linear* part of the head, the mean of
the dense map equals the global embedding only when the head is linear after the
pool; with ConvNeXt's LayerNorm it is close but not equal, which is the same gap
MaskCLIP accepts for ResNet towers. Attention-pooling heads (``timm_pool`` =
``abs_attn`` / ``rot_attn``, timm's ``map`` pooling) have no per-location form and
are refused, as are trunks whose features are tokens rather than a 2-D map (timm ViTs).
"""
from __future__ import annotations

from torch import Tensor, nn

from batchseg.errors import ModelLoadError

# Per-location pooling is the identity for these SelectAdaptivePool2d kinds (on a 1x1 map);
# "catavgmax" doubles the channels, which the head after it expects.
_POINTWISE_POOLS = ("avg", "max", "avgmax", "catavgmax", "fast", "")
_ATTENTION_POOLS = ("abs_attn", "rot_attn", "attn", "map")
_NOT_A_MAP = (
    "unsupported timm CLIP tower {name}: its trunk does not pool a 2-D feature map with timm's "
    "SelectAdaptivePool2d (token or attention pooling, e.g. a timm ViT); batchseg supports timm CNN "
    "towers such as ConvNeXt"
)


def is_timm_tower(visual: nn.Module | None) -> bool:
    """True for open_clip's ``TimmModel`` adapter (checked structurally: a ``trunk`` with
    timm's ``forward_features``/``forward_head`` and an adapter ``head``)."""
    trunk = getattr(visual, "trunk", None)
    return (
        trunk is not None
        and isinstance(getattr(visual, "head", None), nn.Module)
        and all(callable(getattr(trunk, n, None)) for n in ("forward_features", "forward_head"))
    )


def check_timm_config(vision_cfg: dict) -> None:
    """Refuse unsupported timm towers from an open_clip ``vision_cfg`` alone (before any
    weights are fetched or allocated: the trunk is built on the meta device to see how
    it pools). Raises :class:`ModelLoadError`."""
    import timm
    import torch

    name = vision_cfg.get("timm_model_name")
    pool = vision_cfg.get("timm_pool", "avg")
    if pool in _ATTENTION_POOLS:
        raise ModelLoadError(
            f"timm image tower {name!r} with attention pooling (timm_pool={pool!r}) is not supported: an "
            "attention pool has no per-location form; batchseg supports timm CNN towers with average or max "
            "pooling (e.g. open_clip's convnext_* models)"
        )
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r} in the CLIP config (see timm.list_models())")
    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False)
    if _trunk_pool(trunk) is None:
        raise ModelLoadError(_NOT_A_MAP.format(name=type(trunk).__name__))


def check_timm(visual: nn.Module | None) -> None:
    """Raise :class:`ModelLoadError` unless ``visual`` is a timm tower whose head
    :func:`timm_features` can apply per location: a CNN trunk with a 2-D last feature
    map (``feature_info`` with a reduction), a pointwise global pool, and no
    attention-pooling adapter head."""
    if not is_timm_tower(visual):
        raise ModelLoadError(
            f"unsupported CLIP image tower {type(visual).__name__}: expected open_clip's TimmModel"
        )
    trunk = visual.trunk
    name = type(trunk).__name__
    if "pool" in dict(visual.head.named_children()):
        raise ModelLoadError(
            f"unsupported timm CLIP tower ({name} with an attention-pooling head, timm_pool abs_attn/rot_attn): "
            "an attention pool has no per-location form; use a tower with average pooling"
        )
    pool = _trunk_pool(trunk)
    if pool is None:
        raise ModelLoadError(_NOT_A_MAP.format(name=name))
    if pool not in _POINTWISE_POOLS:
        raise ModelLoadError(f"unsupported timm CLIP tower {name}: global pool {pool!r} has no per-location form")
    info = getattr(trunk, "feature_info", None)
    if not info or "reduction" not in info[-1]:
        raise ModelLoadError(f"unsupported timm CLIP tower {name}: it does not report its feature stride (feature_info)")


def _trunk_pool(trunk: nn.Module) -> str | None:
    """The pool type of the trunk's SelectAdaptivePool2d (in its head, or on the trunk
    itself as in timm's ResNet), or None if it has none."""
    from timm.layers import SelectAdaptivePool2d

    for owner in (getattr(trunk, "head", None), trunk):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, SelectAdaptivePool2d):
            return pool.pool_type
    return None


def timm_stride(visual: nn.Module) -> int:
    """Canvas pixels per cell of the last feature map (32 for ConvNeXt)."""
    return int(visual.trunk.feature_info[-1]["reduction"])


def timm_native_grid(visual: nn.Module) -> tuple[int, int]:
    """The dense grid at the tower's configured image size (``image_size // stride``)."""
    h, w = visual.image_size
    stride = timm_stride(visual)
    return h // stride, w // stride


def timm_dims(visual: nn.Module) -> tuple[int, int]:
    """(D, C): the joint-space dimension of the dense map and the trunk's channel count
    (the key dimension). D is the output of the last Linear of the adapter head, or of the
    trunk's classifier when open_clip uses it as the projection, else C."""
    channels = int(visual.trunk.num_features)
    for module in (visual.head, visual.trunk.get_classifier()):
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if linears:
            return int(linears[-1].out_features), channels
    return channels, channels


def timm_features(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense features, keys and the global embedding of a timm tower in one trunk pass.

    Args:
        visual: open_clip ``TimmModel`` in eval mode that passed :func:`check_timm`.
        pixels: (B, 3, S, S) normalised images, S a multiple of :func:`timm_stride`
            (cast here to the tower's weight dtype).

    Returns:
        dense: (B, D, h, w) the tower's head (the trunk head's norm / pre-logits /
            classifier and the adapter projection) applied at each location of the last
            feature map, h = w = S // stride, D = joint (text) space dimension.
        keys: (B, C, h, w) the last feature map itself, C = ``trunk.num_features``.
        global_: (B, D) the tower's normal output, bit-for-bit ``model.encode_image(pixels)``.
    """
    f, _, global_ = timm_tokens(visual, pixels)
    dense, keys = timm_head(visual, f)
    return dense, keys, global_


def timm_tokens(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, None, Tensor]:
    """What ``embed`` stores for a timm tower: (the trunk's last feature map (B, C, h, w),
    no class token, the global embedding (B, D) == ``model.encode_image``)."""
    trunk = visual.trunk
    pixels = pixels.to(next(visual.parameters()).dtype)
    f = trunk.forward_features(pixels)  # (B, C, h, w)
    if f.ndim != 4:
        raise ModelLoadError(f"timm trunk {type(trunk).__name__} returned {f.ndim}-d features, not a 2-D map")
    global_ = visual.head(trunk.forward_head(f))  # TimmModel.forward after the trunk's features
    return f.contiguous(), None, global_


def timm_head(visual: nn.Module, f: Tensor):
    """The dense head of a timm tower on a stored feature map ``f`` (B, C, h, w):
    :class:`batchseg.models.dense_heads.HeadOutput` with dense (B, D, h, w), the tower's
    head applied at every location, and keys = ``f`` itself."""
    from batchseg.models.dense_heads import HeadOutput

    b, c, h, w = f.shape
    cells = f.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)  # every location as its own 1x1 map
    dense = visual.head(visual.trunk.forward_head(cells))  # (B*h*w, D)
    dense = dense.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    return HeadOutput(dense, f.contiguous())
