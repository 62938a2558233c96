"""What the `pseudolabel` driver plans with before any model runs: the images to label.

Torch-free, so deciding that every round is already complete (a no-op rerun) or
refusing a settings mismatch never imports torch; the worker side
(:mod:`batchseg.stages.pseudolabel_shard`) re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelImage:
    """One stored image as the label stage needs it (from its manifest row)."""

    image_id: str
    zarr_row: int
    height: int
    width: int
    clip_valid_h: int
    clip_valid_w: int
    sam_valid_h: int | None
    sam_valid_w: int | None
