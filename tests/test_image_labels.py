import numpy as np
import pytest
import torch

from batchseg.io.geometry import letterbox
from batchseg.labels.image_labels import (
    ImageFrame,
    grid_probs_to_work,
    grid_targets,
    instance_rows,
    label_and_confidence,
    mask_vote_confidence,
    semantic_rows,
    to_original,
)
from batchseg.labels.recognise import refine_semantic
from batchseg.labels.rle import decode_mask

NAMES = ("cat", "dog", "sofa")


@pytest.mark.parametrize("height, width, max_side, work", [
    (30, 50, 1024, (30, 50)), (2000, 1000, 1000, (1000, 500)), (1, 5000, 500, (1, 500)), (999, 333, 100, (100, 33)),
])
def test_frame_work_size(height, width, max_side, work):
    frame = ImageFrame.create("x", height, width, max_side)
    assert (frame.work_h, frame.work_w) == work
    assert frame.scaled == (work != (height, width))


def test_semantic_rows_decode_to_the_label_map_at_original_size():
    rng = np.random.default_rng(0)
    frame = ImageFrame.create("img", 40, 70, max_side=35)  # work size 20x35, rows in 40x70
    label = rng.integers(-1, 3, size=(frame.work_h, frame.work_w))
    confidence = rng.random(label.shape).astype(np.float32)
    rows = semantic_rows(frame, label, confidence, NAMES, "maskclip", 0)
    assert [r["class_id"] for r in rows] == sorted(set(label[label >= 0].tolist()))
    rebuilt = np.full((40, 70), -1)
    for row in rows:
        mask = decode_mask(row["mask"])
        assert mask.shape == (40, 70) and row["mask"]["size"] == [40, 70]
        assert (rebuilt[mask] == -1).all()  # never overlapping
        rebuilt[mask] = row["class_id"]
        assert row["class_name"] == NAMES[row["class_id"]] and row["area"] == mask.sum()
        np.testing.assert_allclose(row["score"], confidence[label == row["class_id"]].mean(), rtol=1e-6)
    expected = np.kron(label, np.ones((2, 2), dtype=int))  # exact 2x nearest upscale
    np.testing.assert_array_equal(rebuilt, expected)


def test_instance_rows_skip_empty_masks_and_may_overlap():
    frame = ImageFrame.create("img", 10, 12, 100)
    masks = np.zeros((3, 10, 12), dtype=bool)
    masks[0, :5], masks[2, 3:8] = True, True
    rows = instance_rows(frame, masks, np.array([0, 1, 2]), np.array([0.9, 0.5, 0.7]), NAMES, "sam", 0)
    assert [r["segment_id"] for r in rows] == [0, 2]
    assert rows[1]["bbox"] == [0.0, 3.0, 12.0, 5.0] and rows[1]["kind"] == "instance"


def test_label_and_confidence_floor():
    probs = torch.tensor([[[0.6, 0.2]], [[0.4, 0.3]], [[0.0, 0.5]]])
    label, conf = label_and_confidence(probs)
    assert label.tolist() == [[0, 2]]
    label, _ = label_and_confidence(probs, floor=0.55)
    assert label.tolist() == [[0, -1]]
    np.testing.assert_allclose(conf, [[0.6, 0.5]])


def test_mask_vote_confidence_follows_the_refinement_winner():
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.dirichlet(np.ones(3), size=(6, 6)).transpose(2, 0, 1).astype(np.float32))
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, :4, :4] = True
    masks[1, 2:6, 2:6] = True
    scores = np.array([0.4, 0.8], dtype=np.float32)
    class_ids = np.array([0, 1])
    refined = refine_semantic(probs, torch.from_numpy(masks), torch.from_numpy(scores)).numpy()
    confidence = probs.max(0).values.numpy()
    voted = mask_vote_confidence(refined, confidence, masks, class_ids, scores)
    for y in range(6):
        for x in range(6):
            covering = [i for i in range(2) if masks[i, y, x] and refined[y, x] == class_ids[i]]
            expected = max((scores[i] for i in covering), default=confidence[y, x])
            assert voted[y, x] == pytest.approx(expected)


@pytest.mark.parametrize("height, width", [(30, 50), (50, 30), (40, 40)])
def test_grid_targets_sample_cell_centres_inside_the_valid_region(height, width):
    canvas, grid = 64, 8
    box = letterbox(height, width, canvas)
    label = np.arange(height * width).reshape(height, width) % 3
    confidence = np.full((height, width), 0.75, dtype=np.float32)
    target, target_conf = grid_targets(label, confidence, grid, canvas, box.valid_h, box.valid_w)
    assert target.dtype == np.int16 and target.shape == (grid, grid)
    for i in range(grid):
        for j in range(grid):
            cy, cx = (i + 0.5) * canvas / grid, (j + 0.5) * canvas / grid
            if cy >= box.valid_h or cx >= box.valid_w:
                assert target[i, j] == -1 and target_conf[i, j] == 0
            else:
                y, x = int(cy * height / box.valid_h), int(cx * width / box.valid_w)
                assert target[i, j] == label[y, x] and target_conf[i, j] == np.float16(0.75)


def test_grid_probs_to_work_maps_the_valid_region_only():
    canvas, frame = 32, ImageFrame.create("x", 10, 20, 100)
    box = letterbox(10, 20, canvas)
    probs = torch.zeros(2, 4, 4)
    probs[0, :2] = 1.0  # top half of the canvas is class 0 — that is the whole valid region (16 of 32 rows)
    probs[1, 2:] = 1.0
    work = grid_probs_to_work(probs, canvas, box.valid_h, box.valid_w, frame)
    assert work.shape == (2, 10, 20)
    assert (work[0, :6] > 0.9).all()  # well inside the valid region
    assert to_original(np.ones((10, 20), dtype=bool), frame).shape == (10, 20)
