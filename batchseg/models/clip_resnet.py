"""MaskCLIP dense features for open_clip's ``ModifiedResNet`` image tower.

Kept apart from :mod:`batchseg.models.clip` (which owns loading, the ViT path and
the public API) so each file stays readable. Only :class:`batchseg.models.clip.DenseClip`
should call these functions.

The dense form follows the official MaskCLIP code (``MaskClipHead.forward``,
``vit=False`` branch): the attention pool's projections are applied as 1x1 convs
to the ``layer4`` feature map,

    dense = c_proj(v_proj(f)),    keys = k_proj(f),

**without** the attention pool's positional embedding. The MaskCLIP paper's prose
("c_proj(v_proj(x))") could be read either way, but its released head feeds the raw
backbone output ``x`` to ``v_proj``/``k_proj`` and never touches
``positional_embedding``; batchseg matches the code so results compare with the
paper's numbers. The positional embedding is still used (interpolated to the canvas
at load time) by the global embedding, which is the tower's normal attention pool.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from batchseg.errors import ModelLoadError

# ModifiedResNet's total stride: stem conv (stride 2) + stem avgpool (2) + layer2..4
# (stride 2 each) = 32. It is fixed by the architecture, not by a config value.
RESNET_STRIDE = 32


def is_modified_resnet(visual: nn.Module) -> bool:
    """True for open_clip's ``ModifiedResNet`` (checked structurally, not by class
    identity, so a re-imported or subclassed open_clip still matches)."""
    return all(hasattr(visual, name) for name in ("stem", "layer4", "attnpool")) and all(
        hasattr(visual.attnpool, name) for name in ("positional_embedding", "v_proj", "k_proj", "c_proj")
    )


def check_resnet(visual: nn.Module) -> None:
    """Raise :class:`ModelLoadError` unless ``visual`` is a ModifiedResNet whose
    attention pool has the four ``nn.Linear`` projections this module reads."""
    if not is_modified_resnet(visual):
        raise ModelLoadError(
            f"unsupported CLIP image tower {type(visual).__name__}: expected open_clip's ModifiedResNet"
        )
    pool = visual.attnpool
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        if not isinstance(getattr(pool, name, None), nn.Linear):
            raise ModelLoadError(f"unsupported ModifiedResNet attention pool: {name} is not a Linear layer")


def resnet_features(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense features, keys and the global embedding of a ModifiedResNet in one pass.

    Args:
        visual: open_clip ``ModifiedResNet`` (eval mode; its attention pool's positional
            embedding already matches ``pixels``' grid).
        pixels: (B, 3, S, S) normalised images, S a multiple of 32, in the tower's dtype.

    Returns:
        dense: (B, D, g, g) ``c_proj(v_proj(f))`` with f the layer4 map, D = output dim
            (the joint image-text space), g = S // 32.
        keys: (B, C, g, g) ``k_proj(f)``, C = ``k_proj.out_features`` (the layer4 width).
        global_: (B, D) the tower's own attention-pooled embedding, bit-for-bit what
            ``model.encode_image(pixels)`` returns.
    """
    f = visual.stem(pixels)
    f = visual.layer4(visual.layer3(visual.layer2(visual.layer1(f))))  # (B, C, g, g)
    global_ = visual.attnpool(f)  # the normal path, so global_ == encode_image
    gh, gw = f.shape[-2:]
    pool = visual.attnpool
    tokens = f.flatten(2).transpose(1, 2)  # (B, g*g, C), row-major like the feature map
    dense = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
    keys = F.linear(tokens, pool.k_proj.weight, pool.k_proj.bias)
    return tokens_to_map(dense, gh, gw), tokens_to_map(keys, gh, gw), global_


def tokens_to_map(tokens: Tensor, gh: int, gw: int) -> Tensor:
    """(B, gh*gw, D) row-major tokens -> contiguous (B, D, gh, gw) (contiguous because
    callers store these maps, and a permuted view would be copied there anyway)."""
    return tokens.reshape(tokens.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous()

