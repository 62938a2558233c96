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
import zarr

from batchseg.io.store import store_path
from batchseg.io.tables import round_folder
from batchseg.labels.selftrain import (
    SegHead, SelfTrainSettings, TrainReport, balanced_class_weights, save_head, train_head,
)
from batchseg.stages.pseudolabel_shard import GRID_STORE, LabelImage, RoundContext

STATS_BLOCK = 256  # grid rows read at a time, so statistics stream over any dataset size


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]
    steps: int
    seconds: float
    pixels_used: int


def _read_rows(array: zarr.Array, rows: list[int]) -> np.ndarray:
    return np.stack([np.asarray(array[row]) for row in rows])


def train_round(ctx: RoundContext, images: tuple[LabelImage, ...], settings: SelfTrainSettings) -> TrainResult:
    """Train this round's head on round ``ctx.round_index - 1``'s targets; save it to ``ctx.head_path``."""
    torch.manual_seed(settings.seed)
    features = zarr.open_group(str(store_path(ctx.out)), mode="r")
    targets = zarr.open_group(str(round_folder(ctx.out, ctx.round_index - 1) / GRID_STORE), mode="r")
    rows = sorted(image.zarr_row for image in images)
    sam_channels = ctx.geometry.sam_embed_shape[0] if ctx.use_sam else None
    head = SegHead(ctx.classifier, sam_channels, ctx.geometry.clip_dense_dim, settings.hidden,
                   settings.temperature, seed=settings.seed)

    def batches(epoch: int):
        order = np.random.default_rng([settings.seed, epoch]).permutation(rows)
        for start in range(0, len(order), settings.batch_size):
            chunk = [int(r) for r in order[start : start + settings.batch_size]]
            label = torch.from_numpy(_read_rows(targets["label"], chunk).astype(np.int64))
            confidence = torch.from_numpy(_read_rows(targets["conf"], chunk).astype(np.float32))
            label[confidence < settings.conf_thresh] = -1
            clip = torch.from_numpy(_read_rows(features["clip_dense"], chunk)).float()
            sam = torch.from_numpy(_read_rows(features["sam"], chunk)).float() if ctx.use_sam else None
            yield sam, clip, label

    weights = None
    if settings.class_balance > 0:
        counts = target_counts(targets, rows, settings.conf_thresh, len(ctx.names))
        weights = balanced_class_weights(counts, settings.class_balance)
    report: TrainReport = train_head(head, batches, settings, class_weights=weights)
    save_head(head, ctx.head_path)
    return TrainResult(list(report.losses), report.steps, report.seconds, report.pixels_used)


def target_counts(targets: zarr.Group, rows: list[int], conf_thresh: float, num_classes: int) -> np.ndarray:
    """Pixels per class that training will use (label set, confidence >= ``conf_thresh``)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for start in range(0, len(rows), STATS_BLOCK):
        chunk = rows[start : start + STATS_BLOCK]
        label = _read_rows(targets["label"], chunk).astype(np.int64)
        confidence = _read_rows(targets["conf"], chunk).astype(np.float32)
        used = (label >= 0) & (confidence >= conf_thresh)
        counts += np.bincount(label[used], minlength=num_classes)
    return counts


def round_stats(out: Path, round_index: int, images: tuple[LabelImage, ...], names: tuple[str, ...]) -> dict:
    """Class histogram, mean confidence and agreement with the previous round, on target grids."""
    grid = zarr.open_group(str(round_folder(out, round_index) / GRID_STORE), mode="r")
    previous = None
    if round_index > 0:
        previous = zarr.open_group(str(round_folder(out, round_index - 1) / GRID_STORE), mode="r")
    rows = sorted(image.zarr_row for image in images)
    histogram = np.zeros(len(names), dtype=np.int64)
    conf_sum, labelled, agree, both = 0.0, 0, 0, 0
    for start in range(0, len(rows), STATS_BLOCK):
        chunk = rows[start : start + STATS_BLOCK]
        label = _read_rows(grid["label"], chunk).astype(np.int64)
        confidence = _read_rows(grid["conf"], chunk).astype(np.float64)
        mask = label >= 0
        histogram += np.bincount(label[mask], minlength=len(names))
        conf_sum += float(confidence[mask].sum())
        labelled += int(mask.sum())
        if previous is not None:
            before = _read_rows(previous["label"], chunk).astype(np.int64)
            common = mask & (before >= 0)
            both += int(common.sum())
            agree += int((label[common] == before[common]).sum())
    return {
        "class_histogram": {name: int(count) for name, count in zip(names, histogram)},
        "mean_confidence": conf_sum / labelled if labelled else None,
        "labelled_cells": labelled,
        "agreement_with_previous": (agree / both if both else None) if previous is not None else None,
    }


def train_result_json(result: TrainResult | None) -> dict | None:
    return asdict(result) if result is not None else None
