"""Fast NMS (YOLACT) over boxes or masks, plus the IoU matrices it needs.

Fast NMS replaces classic NMS's sequential loop by one matrix operation: sort
by score, take the IoU matrix of the sorted items, keep its strict upper
triangle (entry ``[i, j]`` with ``i < j`` is the overlap of ``j`` with a
*higher-scored* ``i``), and keep item ``j`` iff the maximum of column ``j`` is
``<= iou_thresh``.

Convention (same as YOLACT's ``iou_max <= thresh`` and ``torchvision.ops.nms``):
an item is suppressed by a higher-scored item whose IoU with it is **strictly
greater** than ``iou_thresh``. Hence ``iou_thresh=1.0`` keeps everything, even
exact duplicates (IoU exactly 1.0 is not > 1.0), and ``iou_thresh=0.0`` removes
every item that overlaps (IoU > 0) any higher-scored item.

Difference from classic NMS: classic NMS only lets *kept* items suppress; Fast
NMS lets every higher-scored item suppress, including ones that were themselves
suppressed. With A > B > C in score, A~B and B~C overlapping but A, C disjoint,
classic NMS keeps A and C; Fast NMS keeps only A. Fast NMS therefore keeps a
subset of what classic NMS keeps.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

IoUSource = Tensor | Callable[[Tensor], Tensor]

# float32 sums of 0/1 values are exact integers only below 2**24.
_EXACT_F32 = 2**24


def box_iou_matrix(boxes: Tensor, other: Tensor | None = None) -> Tensor:
    """Pairwise IoU of axis-aligned boxes.

    Args:
        boxes: ``(N, 4)`` ``x1, y1, x2, y2`` (any float dtype; ``x2 < x1`` counts as empty).
        other: optional ``(M, 4)``; defaults to ``boxes``.

    Returns:
        float32 ``(N, M)`` in ``[0, 1]``; a pair whose union is empty has IoU 0
        (not NaN), so degenerate boxes never suppress anything.
    """
    a = boxes.float()
    b = a if other is None else other.float().to(a.device)
    if a.ndim != 2 or a.shape[1] != 4 or b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N,4), got {tuple(a.shape)} and {tuple(b.shape)}")
    # Per-coordinate broadcasting with in-place ops: no (N, M, 2) temporaries, so
    # memory is a few (N, M) float32 buffers and time is a handful of passes.
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    inter = torch.minimum(a[:, None, 2], b[None, :, 2]).sub_(torch.maximum(a[:, None, 0], b[None, :, 0])).clamp_min_(0)
    height = torch.minimum(a[:, None, 3], b[None, :, 3]).sub_(torch.maximum(a[:, None, 1], b[None, :, 1])).clamp_min_(0)
    inter.mul_(height)
    del height
    union = (area_a[:, None] + area_b[None, :]).sub_(inter)
    # union == 0 only when both boxes are empty (then inter == 0 too): IoU 0, not NaN.
    return inter.div_(union.clamp_min_(1e-12))


def mask_iou_matrix(masks: Tensor, chunk: int = 64) -> Tensor:
    """Pairwise IoU of binary masks, by matrix products of flattened masks.

    Intersections are ``M @ M^T`` of the ``(N, H*W)`` 0/1 matrix, done in blocks of
    ``chunk`` masks so at most ``2 * chunk`` masks are expanded to float at once
    (``N`` masks of a megapixel each would otherwise need ``4N`` MB). Counts are
    exact: float32 below 2**24 pixels per mask, float64 above.

    Args:
        masks: ``(N, H, W)`` bool (or 0/1) masks.
        chunk: masks per block.

    Returns:
        float32 ``(N, N)`` in ``[0, 1]``; two empty masks have IoU 0.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N,H,W), got {tuple(masks.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = masks.shape[0]
    flat = masks.reshape(n, -1).bool()
    dtype = torch.float32 if flat.shape[1] < _EXACT_F32 else torch.float64
    area = flat.sum(dim=1).to(dtype)  # integer count, exact
    inter = torch.empty(n, n, dtype=dtype, device=flat.device)
    for i in range(0, n, chunk):
        fi = flat[i : i + chunk].to(dtype)
        for j in range(i, n, chunk):
            fj = fi if j == i else flat[j : j + chunk].to(dtype)
            block = fi @ fj.T
            inter[i : i + chunk, j : j + chunk] = block
            inter[j : j + chunk, i : i + chunk] = block.T  # symmetric: half the products
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return iou.float()


def fast_nms(
    scores: Tensor,
    iou: IoUSource,
    iou_thresh: float,
    *,
    top_k: int | None = None,
    class_ids: Tensor | None = None,
) -> Tensor:
    """Fast NMS; returns kept indices into ``scores``, highest score first.

    Args:
        scores: ``(N,)`` float scores.
        iou: either the ``(N, N)`` IoU matrix in the original order, or a callable
            ``iou(order) -> (n, n)`` returning the IoU of items ``order`` (a
            LongTensor of original indices, sorted by score, truncated to
            ``top_k``) in that order, so only the needed pairs are computed.
        iou_thresh: suppress an item whose IoU with a higher-scored item is
            ``> iou_thresh`` (see module docstring).
        top_k: consider only the ``top_k`` highest scores (YOLACT's ``top_k``);
            the rest are dropped. ``None`` considers all.
        class_ids: optional ``(N,)`` ints: items of different classes never
            suppress each other (per-class NMS in one matrix).

    Returns:
        int64 ``(n_kept,)`` original indices, in descending score order. Ties in
        score are ordered by original index (stable sort), so results are
        deterministic.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be (N,), got {tuple(scores.shape)}")
    if not iou_thresh >= 0:  # also rejects NaN
        raise ValueError(f"iou_thresh must be >= 0, got {iou_thresh}")
    n = scores.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    if top_k is not None:
        order = order[: max(int(top_k), 0)]
    if order.numel() == 0:
        return order
    if callable(iou):
        m = iou(order).float()
    else:
        if iou.shape != (n, n):
            raise ValueError(f"iou must be ({n},{n}), got {tuple(iou.shape)}")
        iou = iou.to(order.device)
        m = iou[order][:, order].float()
    if class_ids is not None:
        cls = class_ids.to(order.device)[order]
        m = m * (cls[:, None] == cls[None, :])
    # Entry [i, j], i < j: overlap of j with a higher-scored i. The diagonal
    # (self-IoU 1) and the lower triangle (lower-scored items) must not count.
    col_max = m.triu_(diagonal=1).max(dim=0).values
    return order[col_max <= iou_thresh]


def fast_nms_boxes(
    boxes: Tensor, scores: Tensor, iou_thresh: float, *, top_k: int | None = None,
    class_ids: Tensor | None = None,
) -> Tensor:
    """Fast NMS on ``(N, 4)`` xyxy boxes; see :func:`fast_nms`."""
    return fast_nms(
        scores, lambda order: box_iou_matrix(boxes[order]), iou_thresh,
        top_k=top_k, class_ids=class_ids,
    )


def fast_nms_masks(
    masks: Tensor, scores: Tensor, iou_thresh: float, *, top_k: int | None = None,
    class_ids: Tensor | None = None,
) -> Tensor:
    """Fast NMS on ``(N, H, W)`` bool masks (mask IoU); see :func:`fast_nms`."""
    return fast_nms(
        scores, lambda order: mask_iou_matrix(masks[order]), iou_thresh,
        top_k=top_k, class_ids=class_ids,
    )
