"""Per-image label making: probability maps and masks to label rows and training targets.

Everything here works on one image at its *work size*: the original size, or smaller
when the longest side exceeds a cap, so memory per image stays bounded; only the
final RLE masks are mapped up to original pixels (nearest neighbour, exact for a
uniform scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from batchseg.io.geometry import letterbox
from batchseg.io.statuses import LabelKind, LabelSource
from batchseg.labels.rle import encode_mask, rle_area, rle_bbox_xywh
from batchseg.labels.maskclip import crop_to_original, upsample_to_canvas


@dataclass(frozen=True)
class ImageFrame:
    """Where one image lives: original size, work size, valid regions on each canvas."""

    image_id: str
    height: int
    width: int
    work_h: int
    work_w: int

    @classmethod
    def create(cls, image_id: str, height: int, width: int, max_side: int) -> "ImageFrame":
        if max(height, width) <= max_side:
            return cls(image_id, height, width, height, width)
        # letterbox's rounding, so the work size keeps the stored canvas's aspect exactly.
        box = letterbox(height, width, max_side)
        return cls(image_id, height, width, box.valid_h, box.valid_w)

    @property
    def scaled(self) -> bool:
        return (self.work_h, self.work_w) != (self.height, self.width)


def grid_probs_to_work(probs: Tensor, canvas: int, valid_h: int, valid_w: int, frame: ImageFrame) -> Tensor:
    """(C, g, g) probabilities on a square canvas grid → (C, work_h, work_w) on the image.

    Bilinear up to the canvas, crop the valid (letterboxed) region, resize to the
    work size; values stay probabilities (each pixel's vector still sums to ~1).
    """
    on_canvas = upsample_to_canvas(probs.float(), canvas)
    return crop_to_original(on_canvas, valid_h, valid_w, frame.work_h, frame.work_w)


def to_original(mask: np.ndarray, frame: ImageFrame) -> np.ndarray:
    """(work_h, work_w) bool → (height, width) bool, nearest neighbour."""
    if not frame.scaled:
        return mask
    up = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(frame.height, frame.width), mode="nearest")
    return up[0, 0].numpy() > 0.5


def _row(frame: ImageFrame, kind: LabelKind, segment_id: int, class_id: int, class_name: str, score: float,
         source: LabelSource, round_index: int, mask: np.ndarray) -> dict:
    rle = encode_mask(to_original(mask, frame))
    return {
        "image_id": frame.image_id,
        "kind": kind,
        "segment_id": segment_id,
        "class_id": class_id,
        "class_name": class_name,
        "score": float(score),
        "source": source,
        "round": round_index,
        "bbox": list(rle_bbox_xywh(rle)),
        "area": int(rle_area(rle)),
        "mask": {"size": list(rle["size"]), "counts": rle["counts"]},
    }


def semantic_rows(frame: ImageFrame, label: np.ndarray, confidence: np.ndarray, names: tuple[str, ...],
                  source: LabelSource, round_index: int) -> list[dict]:
    """One row per class present in ``label`` (work size, int, -1 = unlabelled).

    Rows of one image never overlap: each pixel has one class. The score is the
    mean confidence over the segment.
    """
    rows = []
    for class_id in np.unique(label):
        if class_id < 0:
            continue
        mask = label == class_id
        rows.append(_row(frame, LabelKind.SEMANTIC, int(class_id), int(class_id), names[class_id],
                         float(confidence[mask].mean()), source, round_index, mask))
    return rows


def instance_rows(frame: ImageFrame, masks: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
                  names: tuple[str, ...], source: LabelSource, round_index: int) -> list[dict]:
    """One row per mask (N, work_h, work_w) bool; instance rows may overlap."""
    return [
        _row(frame, LabelKind.INSTANCE, index, int(class_ids[index]), names[int(class_ids[index])],
             float(scores[index]), source, round_index, masks[index])
        for index in range(masks.shape[0])
        if masks[index].any()
    ]


def label_and_confidence(probs: Tensor, floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel argmax class and its probability from (C, h, w) probabilities.

    With ``floor``, pixels whose best probability is below it are unlabelled (-1).
    """
    confidence, label = probs.max(dim=0)
    label = label.to(torch.int64)
    if floor is not None:
        label[confidence < floor] = -1
    return label.numpy(), confidence.float().numpy()


def mask_vote_confidence(label: np.ndarray, confidence: np.ndarray, masks: np.ndarray, class_ids: np.ndarray,
                         scores: np.ndarray) -> np.ndarray:
    """Confidence of a SAM-refined map: a pixel a mask voted for gets that mask's score.

    Where the refined class equals a covering mask's class, the pooled probability
    of the whole mask is a steadier confidence than the per-pixel one. Masks are
    applied in ``refine_semantic``'s priority order (higher score, then smaller,
    then lower index wins), lowest first, so the winner is written last.
    """
    refined = confidence.copy()
    n = masks.shape[0]
    areas = masks.reshape(n, -1).sum(1)
    order = np.lexsort((-np.arange(n), -areas, np.nan_to_num(scores.astype(np.float64), nan=-np.inf)))
    for index in order:
        if class_ids[index] < 0:  # a mask that paints nothing lends no confidence
            continue
        region = masks[index] & (label == class_ids[index])
        refined[region] = scores[index]
    return refined


def grid_targets(label: np.ndarray, confidence: np.ndarray, grid: int, canvas: int, valid_h: int,
                 valid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample a work-size label map at the centres of a (grid x grid) canvas grid.

    Returns ``(label, confidence)`` of shape (grid, grid), int16 (-1 where the cell
    centre falls in the padding or the pixel is unlabelled) and float16.
    """
    height, width = label.shape
    centres = (np.arange(grid) + 0.5) * canvas / grid
    rows = np.floor(centres * height / valid_h).astype(np.int64)
    cols = np.floor(centres * width / valid_w).astype(np.int64)
    inside_r, inside_c = centres < valid_h, centres < valid_w
    out_label = np.full((grid, grid), -1, dtype=np.int16)
    out_conf = np.zeros((grid, grid), dtype=np.float16)
    r_idx = np.clip(rows, 0, height - 1)
    c_idx = np.clip(cols, 0, width - 1)
    sampled = label[np.ix_(r_idx, c_idx)]
    sampled_conf = confidence[np.ix_(r_idx, c_idx)]
    valid = np.outer(inside_r, inside_c)
    out_label[valid] = sampled[valid]
    out_conf[valid] = sampled_conf[valid]
    return out_label, out_conf
