"""NOH-NMS (Zhou et al. 2020, "Improving Pedestrian Detection by Nearby Objects Hallucination").

Greedy NMS treats every box that overlaps a kept box by more than ``iou_thresh`` as
its duplicate. In a crowd, an overlapping box is often a *different* object right
next to it. The Nearby-Objects Hallucinator predicts, for each detection ``m``:

* ``nearby_score[m]`` in [0, 1]: how likely another object overlaps it (trained on the
  IoU between the detection and the second-best ground-truth object), and
* ``nearby_box[m]``: where that object is (trained on the offset to the second-best object).

NOH-NMS is greedy NMS that *reweights* instead of removing. When ``m`` is taken, each
remaining box ``i`` with ``IoU(b_m, b_i) > iou_thresh`` keeps the fraction

    p_i = nearby_score[m] * exp(-(1 - IoU(b_i, nearby_box[m]))^2 / (2 sigma^2))

of its score (``sigma = 0.2`` by default): a box where ``m``'s hallucinated neighbour is
(IoU near 1) and a neighbour is likely keeps its score; a box elsewhere, or next to a
detection that expects no neighbour, is all but suppressed. Boxes that do not overlap
``m`` are untouched. The next box taken is the remaining one of highest *current*
score. With ``nearby_score = 0`` this is classic greedy NMS with zeroed scores
instead of removals (same kept set once scores of 0 are dropped).

This module is the product (no library implements it); ``tests/test_noh_nms.py``
checks it against a plain-Python loop over the definition above.
"""
from __future__ import annotations

import torch
from torch import Tensor

from batchseg.labels.nms import box_iou_matrix

DEFAULT_SIGMA = 0.2


def noh_nms(boxes: Tensor, scores: Tensor, nearby_boxes: Tensor, nearby_scores: Tensor, iou_thresh: float,
            sigma: float = DEFAULT_SIGMA, score_floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """Density-aware greedy NMS.

    Args:
        boxes: ``(N, 4)`` xyxy detections; ``scores``: ``(N,)`` in [0, 1].
        nearby_boxes: ``(N, 4)`` xyxy hallucinated nearby object of each detection.
        nearby_scores: ``(N,)`` in [0, 1], likelihood that a nearby object exists.
        iou_thresh: overlap above which a box is reweighted by the taken box.
        sigma: width of the Gaussian on ``1 - IoU(box, hallucinated box)``.
        score_floor: boxes whose reweighted score falls to or below this are dropped.

    Returns:
        ``(kept indices int64 (K,), their reweighted scores float32 (K,))`` in the order
        taken (non-increasing current score at the time of taking).
    """
    n = scores.shape[0]
    if boxes.shape != (n, 4) or nearby_boxes.shape != (n, 4) or nearby_scores.shape != (n,):
        raise ValueError("boxes, nearby_boxes (N,4) and scores, nearby_scores (N,) must agree")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    current = scores.float().clone()
    overlap = box_iou_matrix(boxes)  # (N, N)
    to_neighbour = box_iou_matrix(nearby_boxes, boxes)  # [m, i]: IoU(nearby box of m, box i)
    weight = nearby_scores.float()[:, None].clamp(0, 1) * torch.exp(-((1 - to_neighbour) ** 2) / (2 * sigma**2))
    remaining = torch.ones(n, dtype=torch.bool)
    kept, kept_scores = [], []
    for _ in range(n):
        candidates = torch.where(remaining, current, torch.full_like(current, -1.0))
        m = int(torch.argmax(candidates))  # first index among equal scores
        if not remaining[m] or current[m] <= score_floor:
            break
        kept.append(m)
        kept_scores.append(float(current[m]))
        remaining[m] = False
        hit = remaining & (overlap[m] > iou_thresh)
        current = torch.where(hit, current * weight[m], current)
    return torch.tensor(kept, dtype=torch.int64), torch.tensor(kept_scores, dtype=torch.float32)
