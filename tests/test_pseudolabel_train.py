"""Self-training targets: per-class thresholds, MaskCLIP+'s schedule, the round-0 anchor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from batchseg.io.grid_store import TargetGrid, TargetGridWriter, ensure_grid_store, grid_store_path
from batchseg.labels.selftrain import SelfTrainSettings
from batchseg.stages.pseudolabel_train import (
    CONFIDENT_SHARE, anchor_agreement, class_thresholds, target_counts, target_round, training_targets,
)


def _grid(tmp_path, labels: np.ndarray, conf: np.ndarray) -> TargetGrid:
    group = zarr.open_group(str(tmp_path / "grid.zarr"), mode="w", zarr_format=3)
    group.create_array("label", data=labels.astype(np.int16), chunks=(1, *labels.shape[1:]))
    group.create_array("conf", data=conf.astype(np.float16), chunks=(1, *labels.shape[1:]))
    return TargetGrid(tmp_path / "grid.zarr")


def test_grid_store_is_created_grown_and_written_row_by_row(tmp_path):
    ensure_grid_store(tmp_path, 1, rows=2, grid=3)
    grid = TargetGrid.of_round(tmp_path, 1)
    # Unwritten rows read as unlabelled, with no confidence.
    assert grid.labels([0, 1]).tolist() == [[[-1] * 3] * 3] * 2
    assert grid.labels([0]).dtype == np.int16 and grid.confidences([0]).dtype == np.float16
    assert not grid.confidences([1]).any()

    ensure_grid_store(tmp_path, 1, rows=4, grid=3)  # the driver grows it for new images
    label = np.arange(9, dtype=np.int16).reshape(3, 3)
    TargetGridWriter(tmp_path, 1).write(3, label, np.full((3, 3), 0.5))
    grid = TargetGrid.of_round(tmp_path, 1)
    assert grid.labels([3, 0]).tolist() == [label.tolist(), [[-1] * 3] * 3]
    assert grid.confidences([3]).tolist() == [[[0.5] * 3] * 3]
    stored = zarr.open_group(str(grid_store_path(tmp_path, 1)), mode="r")
    assert {name: (stored[name].shape, stored[name].chunks) for name in ("label", "conf")} == {
        "label": ((4, 3, 3), (1, 3, 3)), "conf": ((4, 3, 3), (1, 3, 3))}


def test_class_thresholds_follow_each_class_quantile(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, size=(6, 8, 8))
    conf = rng.random((6, 8, 8))
    conf[labels == 2] *= 0.3  # class 2: the labeller is never sure of it
    group = _grid(tmp_path, labels, conf)
    settings = SelfTrainSettings(conf_thresh=0.5, class_quantile=0.5)
    limits = class_thresholds(group, list(range(6)), settings, 4).numpy()
    stored = group.confidences(range(6)).astype(np.float32)
    for k in range(3):
        values = np.sort(stored[labels == k])
        # The cell of rank floor(q n) (0-based), rounded down to its 1/1000 histogram bin.
        want = min(0.5, np.floor(values[int(0.5 * values.size)] * 1000) / 1000)
        assert limits[k] == pytest.approx(want, abs=1e-6)
        assert (values >= limits[k]).mean() >= 0.5  # at least (1 - q) of the class trains
    assert limits[3] == 0.5  # a class without cells keeps the global threshold
    assert limits[2] < 0.2
    # At least half of class 2's cells now train, none did with conf_thresh alone.
    counts = target_counts(group, list(range(6)), class_thresholds(group, list(range(6)), settings, 4), 4)
    plain = target_counts(group, list(range(6)), class_thresholds(
        group, list(range(6)), SelfTrainSettings(conf_thresh=0.5, class_quantile=None), 4), 4)
    assert plain[2] == 0 and counts[2] >= (labels == 2).sum() // 2


@pytest.mark.parametrize("teacher_rounds, expected", [(1, [0, 1, 2]), (2, [0, 0, 2]), (3, [0, 0, 0])])
def test_target_round_follows_maskclip_plus_schedule(teacher_rounds, expected):
    settings = SelfTrainSettings(teacher_rounds=teacher_rounds)
    assert [target_round(k, settings) for k in (1, 2, 3)] == expected


def test_training_targets_anchor_drops_cells_that_left_round_0(tmp_path):
    previous = np.array([[[0, 1, 2], [1, 1, -1]]])
    conf = np.array([[[0.9, 0.9, 0.6], [0.95, 0.3, 0.9]]])
    first = np.array([[[0, 2, 2], [0, 1, 1]]])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    targets = _grid(tmp_path / "a", previous, conf)
    anchor = _grid(tmp_path / "b", first, np.ones_like(conf))
    limits = np.full(3, 0.5, dtype=np.float32)
    plain = training_targets(targets, [0], limits)
    # Low confidence (0.3) and unlabelled cells never train.
    assert plain.tolist() == [[[0, 1, 2], [1, -1, -1]]]
    # (0,1) and (1,0) moved away from round 0's label: dropped, however confident.
    assert training_targets(targets, [0], limits, anchor).tolist() == [[[0, -1, 2], [-1, -1, -1]]]
    assert target_counts(targets, [0], torch.from_numpy(limits), 3, anchor).tolist() == [1, 0, 1]
    assert target_counts(targets, [0], torch.from_numpy(limits), 3).tolist() == [1, 2, 1]


def _write_round(out, round_index: int, labels: np.ndarray, conf: np.ndarray) -> None:
    ensure_grid_store(out, round_index, rows=labels.shape[0], grid=labels.shape[1])
    writer = TargetGridWriter(out, round_index)
    for row in range(labels.shape[0]):
        writer.write(row, labels[row], conf[row])


def test_anchor_agreement_counts_round_0s_most_confident_cells(tmp_path):
    rng = np.random.default_rng(3)
    first = rng.integers(-1, 3, size=(5, 8, 8)).astype(np.int16)
    conf = rng.random((5, 8, 8))
    later = first.copy()
    flip = rng.random(first.shape) < 0.3
    later[flip & (first >= 0)] = (first[flip & (first >= 0)] + 1) % 3
    _write_round(tmp_path, 0, first, conf)
    _write_round(tmp_path, 2, later, rng.random((5, 8, 8)))
    rows = list(range(5))
    stored = TargetGrid.of_round(tmp_path, 0).confidences(rows).astype(np.float32)
    top = np.zeros(first.shape, dtype=bool)
    for k in range(3):
        values = np.sort(stored[first == k])
        cut = np.floor(values[int((1 - CONFIDENT_SHARE) * values.size)] * 1000)
        top |= (first == k) & (np.floor(stored * 1000) >= cut)
    assert top.sum() >= CONFIDENT_SHARE * (first >= 0).sum()
    want = float((later[top] == first[top]).mean())
    assert anchor_agreement(tmp_path, 2, rows, 3) == pytest.approx(want)
    assert 0.5 < want < 0.9


def test_anchor_agreement_ignores_changes_to_unsure_cells(tmp_path):
    rng = np.random.default_rng(4)
    first = rng.integers(0, 2, size=(3, 6, 6)).astype(np.int16)
    conf = rng.random((3, 6, 6))
    _write_round(tmp_path, 0, first, conf)
    unsure = conf < 0.5  # far below every class's top 30%
    changed = np.where(unsure, 1 - first, first).astype(np.int16)
    _write_round(tmp_path, 1, changed, conf)
    assert anchor_agreement(tmp_path, 1, [0, 1, 2], 2) == 1.0
    _write_round(tmp_path, 2, (1 - first).astype(np.int16), conf)  # every cell overturned
    assert anchor_agreement(tmp_path, 2, [0, 1, 2], 2) == 0.0
    assert anchor_agreement(tmp_path, 0, [0, 1, 2], 2) is None
