"""CLIP preprocessing as the model's own ``preprocess_cfg`` says: resize filter, mean, std, fill.

Every image is letterboxed (longest side resized onto the square canvas, padded
bottom/right: SAM's convention, one geometry for every model). What the letterbox is
filled with, and how pixels are resized and normalised, follows the model's config:

- ``interpolation``: ``bicubic`` (open_clip's default) or ``bilinear``/``nearest``,
  PIL's filters, antialiased when shrinking like open_clip's own transform;
- ``mean``/``std``: the normalisation, for pixels in [0, 1];
- ``fill_color``: open_clip pads in *pixel* space before normalising, so ``fill_color: 0``
  is black. When the model's config states no fill colour, the padding is 0 *after*
  normalisation, i.e. the mean colour (MaskCLIP's and SAM's convention).

What was used is recorded in ``batchseg.json`` (``embed.preprocessing``), and a change is a
settings change. Builds made before it was recorded used bicubic resizing and mean-colour
padding (:data:`LEGACY`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image
from torch import Tensor

from batchseg.errors import ModelLoadError
from batchseg.io.geometry import letterbox

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
MEAN_FILL = "mean"  # how the record names padding with the mean colour


@dataclass(frozen=True)
class ClipPreprocess:
    """How an image becomes CLIP input (besides the letterbox geometry)."""

    mean: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_MEAN)
    std: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_STD)
    interpolation: str = "bicubic"
    fill: int | None = None  # grey level 0..255 of the padding in pixel space; None: the mean colour

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ModelLoadError(f"CLIP preprocess_cfg interpolation {self.interpolation!r} is not supported; "
                                 f"use one of {', '.join(INTERPOLATIONS)}")
        if self.fill is not None and not 0 <= self.fill <= 255:
            raise ModelLoadError(f"CLIP preprocess_cfg fill_color must be a grey level 0..255, got {self.fill!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ModelLoadError(f"CLIP preprocess_cfg needs 3 means and 3 positive stds, got {self.mean}, {self.std}")

    def to_json(self) -> dict[str, Any]:
        return {"interpolation": self.interpolation, "mean": [round(m, 8) for m in self.mean],
                "std": [round(s, 8) for s in self.std], "fill": MEAN_FILL if self.fill is None else self.fill}


def legacy_record(mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """What a build made before preprocessing was recorded used, with the model's mean and std."""
    return ClipPreprocess(tuple(mean), tuple(std)).to_json()


def _stated_keys(model: str, pretrained: str | None) -> set[str]:
    """The preprocessing keys the model's own config states (not open_clip's defaults)."""
    if model.startswith("local-dir:"):
        path = Path(model[len("local-dir:"):]).expanduser() / "open_clip_config.json"
        try:
            cfg = json.loads(path.read_text()).get("preprocess_cfg") or {}
        except (OSError, ValueError, AttributeError):
            return set()
        return set(cfg) if isinstance(cfg, dict) else set()
    if pretrained and not Path(pretrained).expanduser().exists():
        try:
            return set(open_clip.get_pretrained_cfg(model, pretrained) or {})
        except Exception:  # noqa: BLE001 - an unknown tag states nothing; loading reports it
            return set()
    return set()


def model_preprocess(model: torch.nn.Module, spec_model: str, spec_pretrained: str | None) -> ClipPreprocess:
    """The preprocessing an open_clip ``model`` was configured with (its final ``preprocess_cfg``).

    Interpolation, mean and std are open_clip's resolved values (its defaults where the
    config is silent: bicubic, OpenAI's mean and std); the fill colour only when the
    config states one.
    """
    pp = open_clip.get_model_preprocess_cfg(model)
    stated = _stated_keys(spec_model, spec_pretrained)
    fill = pp.get("fill_color") if "fill_color" in stated else None
    if fill is not None and (isinstance(fill, bool) or not isinstance(fill, int)):
        raise ModelLoadError(f"CLIP preprocess_cfg fill_color must be one grey level 0..255, got {fill!r}")
    return ClipPreprocess(
        mean=tuple(float(m) for m in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(s) for s in pp.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=str(pp.get("interpolation", "bicubic")),
        fill=fill,
    )


def preprocess_clip(
    image: np.ndarray, canvas: int, mean: Sequence[float], std: Sequence[float], *,
    interpolation: str = "bicubic", fill: int | None = None,
) -> Tensor:
    """Letterbox one image onto the CLIP canvas.

    Args:
        image: (H, W, 3) uint8 RGB.
        canvas: side of the square output.
        mean, std: per-channel normalisation for pixels in [0, 1] (``DenseClip.mean/std``).
        interpolation: PIL filter name (``ClipPreprocess.interpolation``).
        fill: grey level of the padding in pixel space, or None for the mean colour.

    Returns:
        (3, canvas, canvas) float32: the longest side resized to ``canvas`` with PIL's
        filter (antialiased when shrinking, as open_clip's own transform), placed
        top-left and normalised; the bottom/right padding is ``fill`` before
        normalisation, or 0 after it (the mean colour). The valid size is
        ``letterbox(H, W, canvas)``.
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {arr.shape} dtype {arr.dtype}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    h, w = arr.shape[:2]
    box = letterbox(h, w, canvas)
    if (box.valid_h, box.valid_w) != (h, w):
        pil = Image.fromarray(np.ascontiguousarray(arr))
        arr = np.asarray(pil.resize((box.valid_w, box.valid_h), INTERPOLATIONS[interpolation]))
    valid = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)  # (3, valid_h, valid_w)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    if fill is None:
        out = torch.zeros(3, canvas, canvas, dtype=torch.float32)  # 0 after normalising: the mean colour
    else:
        out = ((torch.full((3, 1, 1), fill / 255.0) - m) / s).expand(3, canvas, canvas).clone()
    out[:, : box.valid_h, : box.valid_w] = (valid - m) / s
    return out
