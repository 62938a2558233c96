"""Self-training round k: train the head on round k-1's confident targets; round statistics.

Training runs as one Dask task (on a GPU worker when there is one); it reads the
stored features and the previous round's target grid from disk, never from the
driver's memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from batchseg.io.grid_store import TargetGrid
from batchseg.io.store import CheckedRowReader
from batchseg.io.tables import selftrain_folder
from batchseg.labels.selftrain import (
    SegHead, SelfTrainSettings, TrainReport, balanced_class_weights, load_head, save_head, train_head,
)
from batchseg.models import runtime
from batchseg.stages.pseudolabel_shard import LabelImage, RoundContext, head_features, stored_rows, worker_classifier

STATS_BLOCK = 256  # grid rows read at a time, so statistics stream over any dataset size
# Dense head features are computed once per training task and kept in memory up to this
# size (float16); beyond it they are recomputed for every batch of every epoch.
FEATURE_CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]
    steps: int
    seconds: float
    pixels_used: int


def target_round(round_index: int, settings: SelfTrainSettings) -> int:
    """Which round's labels round ``round_index`` learns from (MaskCLIP+'s schedule)."""
    return 0 if round_index <= settings.teacher_rounds else round_index - 1


def train_round(ctx: RoundContext, images: tuple[LabelImage, ...], settings: SelfTrainSettings) -> TrainResult:
    """Train this round's head on the targets of :func:`target_round`; save it to ``ctx.head_path``.

    With ``settings.warm_start`` the head starts from the previous round's head (round 1
    starts from MaskCLIP itself: the zero-initialised correction).
    """
    torch.manual_seed(settings.seed)
    features = CheckedRowReader(ctx.out)
    source = target_round(ctx.round_index, settings)
    targets = TargetGrid.of_round(ctx.out, source)
    rows = sorted(image.zarr_row for image in images)
    sam_channels = ctx.geometry.sam_embed_shape[0] if ctx.use_sam else None
    previous = selftrain_folder(ctx.out, ctx.round_index - 1) / ctx.head_path.name
    classifier = worker_classifier(ctx)
    if settings.warm_start and ctx.round_index > 1 and previous.exists():
        head = load_head(previous, classifier)
    else:
        head = SegHead(classifier, sam_channels, ctx.geometry.clip_dense_dim, settings.hidden,
                       settings.temperature, seed=settings.seed)
    device = runtime.worker_device()
    head = head.to(device)  # train on the worker's GPU when it has one
    thresholds = class_thresholds(targets, rows, settings, len(ctx.names))
    anchor = None
    if settings.anchor and source > 0:
        anchor = TargetGrid.of_round(ctx.out, 0)

    clip_features = _HeadFeatures(ctx, features, rows)

    def batches(epoch: int):
        order = np.random.default_rng([settings.seed, epoch]).permutation(rows)
        for start in range(0, len(order), settings.batch_size):
            chunk = [int(r) for r in order[start : start + settings.batch_size]]
            label = torch.from_numpy(training_targets(targets, chunk, thresholds.numpy(), anchor))
            clip = clip_features(chunk).to(device)
            sam = stored_rows(features, "sam", chunk).to(device).float() if ctx.use_sam else None
            yield sam, clip, label

    weights = None
    if settings.class_balance > 0:
        counts = target_counts(targets, rows, thresholds, len(ctx.names), anchor)
        weights = balanced_class_weights(counts, settings.class_balance)
    report: TrainReport = train_head(head, batches, settings, class_weights=weights)
    save_head(head.cpu(), ctx.head_path)
    return TrainResult(list(report.losses), report.steps, report.seconds, report.pixels_used)


class _HeadFeatures:
    """The dense head's features per zarr row, cached in memory when they fit."""

    def __init__(self, ctx: RoundContext, store: CheckedRowReader, rows: list[int]) -> None:
        self.ctx, self.store = ctx, store
        first, _ = head_features(ctx, store, rows[:1])
        self.cache: dict[int, torch.Tensor] | None = None
        if first.numel() * 2 * len(rows) <= FEATURE_CACHE_BYTES:
            self.cache = {}
            for start in range(0, len(rows), 16):
                chunk = rows[start : start + 16]
                dense, _ = head_features(ctx, store, chunk)
                self.cache.update(zip(chunk, dense.half()))

    def __call__(self, chunk: list[int]) -> torch.Tensor:
        if self.cache is not None:
            return torch.stack([self.cache[row] for row in chunk]).float()
        return head_features(self.ctx, self.store, chunk)[0]


def training_targets(targets: TargetGrid, rows: list[int], thresholds: np.ndarray,
                     anchor: TargetGrid | None = None) -> np.ndarray:
    """The cells a round learns from: int64 ``(len(rows), G, G)``, class id or -1 (ignored).

    A cell is kept when it is labelled and its confidence reaches its class's threshold
    (``thresholds``, float ``(C,)``). With ``anchor`` (round 0's target grid), a cell is
    kept only where the target round agrees with round 0 too: a cell a later round
    changed away from the labeller is the round's own guess, and teaching it to the
    next round is how self-training drifts (confirmation bias); the warm-started head
    keeps what it learnt there without being pushed further.
    """
    label = targets.labels(rows).astype(np.int64)
    confidence = targets.confidences(rows).astype(np.float32)
    label[confidence < thresholds[np.maximum(label, 0)]] = -1
    if anchor is not None:
        label[label != anchor.labels(rows).astype(np.int64)] = -1
    return label


def target_counts(targets: TargetGrid, rows: list[int], thresholds: torch.Tensor, num_classes: int,
                  anchor: TargetGrid | None = None) -> np.ndarray:
    """Cells per class that training will use (see :func:`training_targets`)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    limits = thresholds.numpy()
    for start in range(0, len(rows), STATS_BLOCK):
        label = training_targets(targets, rows[start : start + STATS_BLOCK], limits, anchor)
        counts += np.bincount(label[label >= 0], minlength=num_classes)
    return counts


CONF_BINS = 1000  # confidence histogram resolution for the per-class quantiles
# The labeller's most confident cells: per class, the top share of round 0's cells by confidence.
# Later rounds should change few of them; changing more of them than the round before is drift.
CONFIDENT_SHARE = 0.3


def confidence_histograms(grid: TargetGrid, rows: list[int], num_classes: int) -> np.ndarray:
    """Labelled cells per (class, confidence bin): int64 ``(C, CONF_BINS)``, streamed over ``rows``."""
    histogram = np.zeros((num_classes, CONF_BINS), dtype=np.int64)
    for start in range(0, len(rows), STATS_BLOCK):
        chunk = rows[start : start + STATS_BLOCK]
        label = grid.labels(chunk).astype(np.int64).ravel()
        confidence = grid.confidences(chunk).astype(np.float32).ravel()
        keep = label >= 0
        np.add.at(histogram, (label[keep], _bins(confidence[keep])), 1)
    return histogram


def _bins(confidence: np.ndarray) -> np.ndarray:
    return np.clip((confidence * CONF_BINS).astype(np.int64), 0, CONF_BINS - 1)


def quantile_bins(histogram: np.ndarray, quantile: float) -> np.ndarray:
    """Per class, the bin holding the ``quantile`` of its cells (its lower edge keeps at least
    ``1 - quantile`` of them): int64 ``(C,)``; -1 for a class without cells."""
    cuts = np.full(histogram.shape[0], -1, dtype=np.int64)
    for k, counts in enumerate(histogram):
        total = counts.sum()
        if total:
            cuts[k] = int(np.searchsorted(np.cumsum(counts), quantile * total, side="right"))
    return cuts


def class_thresholds(targets: TargetGrid, rows: list[int], settings: SelfTrainSettings, num_classes: int
                     ) -> torch.Tensor:
    """Confidence threshold per class, float32 (C,).

    ``conf_thresh`` for every class; with ``class_quantile`` q, a class's threshold is
    lowered to the q-quantile of its own cells' confidences when that is below
    ``conf_thresh`` (streamed histograms, so memory does not grow with the dataset).
    """
    limits = torch.full((num_classes,), float(settings.conf_thresh))
    if settings.class_quantile is None:
        return limits
    cuts = quantile_bins(confidence_histograms(targets, rows, num_classes), settings.class_quantile)
    for k, cut in enumerate(cuts):
        if cut >= 0:
            limits[k] = min(float(settings.conf_thresh), cut / CONF_BINS)
    return limits


def anchor_agreement(out: Path, round_index: int, rows: list[int], num_classes: int) -> float | None:
    """Share of round 0's most confident cells (:data:`CONFIDENT_SHARE` per class) on which
    round ``round_index`` keeps round 0's label; None for round 0 or when round 0 has none.

    No ground truth is needed: a round that fixes the labeller's mistakes changes its
    unsure cells, while a drifting round starts to overturn the cells it was surest of.
    """
    if round_index == 0:
        return None
    first, grid = TargetGrid.of_round(out, 0), TargetGrid.of_round(out, round_index)
    cuts = quantile_bins(confidence_histograms(first, rows, num_classes), 1.0 - CONFIDENT_SHARE)
    kept, confident = 0, 0
    for start in range(0, len(rows), STATS_BLOCK):
        chunk = rows[start : start + STATS_BLOCK]
        label = first.labels(chunk).astype(np.int64)
        labelled = label >= 0
        top = np.zeros_like(labelled)
        top[labelled] = _bins(first.confidences(chunk).astype(np.float32)[labelled]) >= cuts[label[labelled]]
        confident += int(top.sum())
        kept += int((grid.labels(chunk).astype(np.int64)[top] == label[top]).sum())
    return kept / confident if confident else None


def round_stats(out: Path, round_index: int, images: tuple[LabelImage, ...], names: tuple[str, ...]) -> dict:
    """Class histogram, mean confidence and agreement with the previous round, on target grids."""
    grid = TargetGrid.of_round(out, round_index)
    previous = TargetGrid.of_round(out, round_index - 1) if round_index > 0 else None
    rows = sorted(image.zarr_row for image in images)
    histogram = np.zeros(len(names), dtype=np.int64)
    conf_sum, labelled, agree, both = 0.0, 0, 0, 0
    for start in range(0, len(rows), STATS_BLOCK):
        chunk = rows[start : start + STATS_BLOCK]
        label = grid.labels(chunk).astype(np.int64)
        confidence = grid.confidences(chunk).astype(np.float64)
        mask = label >= 0
        histogram += np.bincount(label[mask], minlength=len(names))
        conf_sum += float(confidence[mask].sum())
        labelled += int(mask.sum())
        if previous is not None:
            before = previous.labels(chunk).astype(np.int64)
            common = mask & (before >= 0)
            both += int(common.sum())
            agree += int((label[common] == before[common]).sum())
    return {
        "class_histogram": {name: int(count) for name, count in zip(names, histogram)},
        "mean_confidence": conf_sum / labelled if labelled else None,
        "labelled_cells": labelled,
        "agreement_with_previous": (agree / both if both else None) if previous is not None else None,
        "anchor_agreement": anchor_agreement(out, round_index, rows, len(names)),
    }


def train_result_json(result: TrainResult | None) -> dict | None:
    return asdict(result) if result is not None else None
