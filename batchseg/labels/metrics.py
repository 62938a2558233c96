"""Semantic segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

Conventions (the same as `batchseg evaluate` reports):

- The confusion matrix has one row per ground-truth class and one column per
  predicted class **plus one last column for "unlabelled"** (prediction ``-1``),
  so its shape is ``(K, K + 1)``: ``conf[g, p]`` counts pixels of ground-truth
  class ``g`` predicted as ``p``; ``conf[g, K]`` counts those left unlabelled.
  An unlabelled prediction is wrong for the pixel's ground-truth class (a false
  negative) and a false positive for no class.
- Ground-truth pixels equal to ``ignore`` are not counted at all.
- IoU of class ``c`` = TP / (TP + FP + FN) = ``conf[c, c] / (row_c + col_c - conf[c, c])``.
- A class absent from the ground truth (``row_c == 0``) has IoU **nan** (whether or
  not it was predicted) and is excluded from mIoU; its false positives still count,
  as false negatives of the true classes. mIoU = mean IoU over the classes present
  in the ground truth (nan if none is).
- Pixel accuracy = correctly predicted / all counted ground-truth pixels
  (unlabelled predictions included in the denominator); nan if none is counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scores:
    """Metrics of one confusion matrix; arrays have one entry per class."""

    iou: np.ndarray  # (K,) float64, nan for classes absent from the ground truth
    intersection: np.ndarray  # (K,) int64: true positives
    union: np.ndarray  # (K,) int64: TP + FP + FN
    gt_pixels: np.ndarray  # (K,) int64: ground-truth pixels of the class (row sums)
    pred_pixels: np.ndarray  # (K,) int64: counted pixels predicted as the class (column sums)
    unlabelled_pixels: int  # counted pixels predicted as nothing (-1)
    total_pixels: int  # counted (non-ignored) ground-truth pixels
    miou: float  # mean IoU over classes present in the ground truth; nan if none
    pixel_accuracy: float  # correct / total; nan if nothing was counted


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int | None = 255) -> np.ndarray:
    """Confusion matrix ``(K, K + 1)`` int64 of one prediction against its ground truth.

    Args:
        pred: ``(H, W)`` integer predicted class ids in ``[0, K)``, or ``-1`` for unlabelled.
        gt: ``(H, W)`` integer ground-truth class ids in ``[0, K)``, or ``ignore``.
        num_classes: ``K``.
        ignore: ground-truth value that is not scored (None: every pixel is scored).

    Raises:
        ValueError: shapes differ, or a value is outside the ranges above.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    gt = gt.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    if ignore is not None:
        keep = gt != ignore
        gt, pred = gt[keep], pred[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = gt[(gt < 0) | (gt >= num_classes)][0]
        raise ValueError(f"ground truth value {bad} is not a class id in [0, {num_classes}) nor ignore={ignore}")
    if pred.size and (pred.min() < -1 or pred.max() >= num_classes):
        bad = pred[(pred < -1) | (pred >= num_classes)][0]
        raise ValueError(f"prediction value {bad} is not a class id in [0, {num_classes}) nor -1 (unlabelled)")
    columns = num_classes + 1
    pred = np.where(pred < 0, num_classes, pred)
    counts = np.bincount(gt * columns + pred, minlength=num_classes * columns)
    return counts.reshape(num_classes, columns).astype(np.int64, copy=False)


def scores_from_confusion(conf: np.ndarray) -> Scores:
    """Per-class IoU, mIoU and pixel accuracy of a ``(K, K + 1)`` confusion matrix.

    Confusion matrices of several images add up: score their sum, not the mean of
    their scores. A square ``(K, K)`` matrix (no unlabelled column) is accepted too.
    """
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"confusion matrix must be (K, K + 1) or (K, K), got shape {conf.shape}")
    conf = conf.astype(np.int64, copy=False)
    k = conf.shape[0]
    tp = np.diagonal(conf).copy()
    gt_pixels = conf.sum(axis=1)
    pred_pixels = conf[:, :k].sum(axis=0)
    union = gt_pixels + pred_pixels - tp
    present = gt_pixels > 0
    iou = np.full(k, np.nan)
    iou[present] = tp[present] / union[present]  # union >= gt_pixels > 0
    total = int(conf.sum())
    unlabelled = int(conf[:, k].sum()) if conf.shape[1] == k + 1 else 0
    return Scores(
        iou=iou,
        intersection=tp,
        union=union,
        gt_pixels=gt_pixels,
        pred_pixels=pred_pixels,
        unlabelled_pixels=unlabelled,
        total_pixels=total,
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
    )
