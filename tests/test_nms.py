"""Fast NMS against its brute-force definition, and the IoU matrices it uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from batchseg.labels.nms import (
    box_iou_matrix,
    fast_nms,
    fast_nms_boxes,
    fast_nms_masks,
    mask_iou_matrix,
)

# Dyadic thresholds: exactly representable, so float32 and float64 IoUs of small
# integer ratios compare the same way against them.
THRESHOLDS = [0.0, 0.25, 0.5, 0.75, 1.0]


def py_box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def py_mask_iou(a, b):
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return inter / union if union > 0 else 0.0


def brute_fast_nms(scores, iou_fn, thresh):
    """Fast NMS by definition: in score order (ties by index), item j is dropped
    iff some earlier item i (kept or not) has IoU(i, j) > thresh."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for pos, j in enumerate(order):
        if not any(iou_fn(order[i], j) > thresh for i in range(pos)):
            kept.append(j)
    return kept


def random_boxes(n, seed, size=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1.0
    return torch.cat([xy, xy + wh], dim=1)


def random_masks(n, seed, h=12, w=15):
    """Rectangles plus noise: overlapping shapes, non-convex, some empty-ish."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        masks[i, y0:y1, x0:x1] = True
        masks[i] ^= rng.random((h, w)) < 0.05
    return torch.from_numpy(masks)


# ------------------------------------------------------------------ IoU matrices


@pytest.mark.parametrize("n", [1, 5, 40])
def test_box_iou_matches_torchvision(n):
    boxes = random_boxes(n, seed=n)
    torch.testing.assert_close(box_iou_matrix(boxes), torchvision.ops.box_iou(boxes, boxes))
    other = random_boxes(3, seed=99)
    torch.testing.assert_close(box_iou_matrix(boxes, other), torchvision.ops.box_iou(boxes, other))


def test_box_iou_degenerate_boxes_are_zero_not_nan():
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 2.0, 2.0]])
    iou = box_iou_matrix(boxes)
    assert torch.isfinite(iou).all()
    assert iou[0, 1] == 0 and iou[2, 2] == 1


@pytest.mark.parametrize("n,chunk", [(1, 64), (7, 64), (7, 1), (10, 3), (33, 8)])
def test_mask_iou_matches_brute_force(n, chunk):
    masks = random_masks(n, seed=n + chunk)
    masks[0] = False  # an empty mask: IoU 0 with everything, itself included
    got = mask_iou_matrix(masks, chunk=chunk)
    m = masks.numpy()
    want = np.array([[py_mask_iou(m[i], m[j]) for j in range(n)] for i in range(n)])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert got.dtype == torch.float32


# ------------------------------------------------------------------ Fast NMS


@pytest.mark.parametrize("thresh", THRESHOLDS)
@pytest.mark.parametrize("n,seed", [(0, 0), (1, 1), (8, 2), (30, 3), (120, 4)])
def test_fast_nms_boxes_matches_definition(n, seed, thresh):
    boxes = random_boxes(n, seed) if n else torch.zeros(0, 4)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1000))
    got = fast_nms_boxes(boxes, scores, thresh)
    b = boxes.tolist()
    want = brute_fast_nms(scores.tolist(), lambda i, j: py_box_iou(b[i], b[j]), thresh)
    assert got.dtype == torch.int64
    assert got.tolist() == want
    # Same answer from a precomputed matrix.
    assert fast_nms(scores, box_iou_matrix(boxes), thresh).tolist() == want


@pytest.mark.parametrize("thresh", THRESHOLDS)
@pytest.mark.parametrize("n,seed", [(1, 1), (6, 2), (25, 3), (60, 4)])
def test_fast_nms_masks_matches_definition(n, seed, thresh):
    masks = random_masks(n, seed)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    got = fast_nms_masks(masks, scores, thresh)
    m = masks.numpy()
    want = brute_fast_nms(scores.tolist(), lambda i, j: py_mask_iou(m[i], m[j]), thresh)
    assert got.tolist() == want


def test_kept_are_in_descending_score_order_and_subset_of_classic_nms():
    boxes = random_boxes(80, seed=7)
    scores = torch.rand(80, generator=torch.Generator().manual_seed(7))
    for thresh in (0.1, 0.3, 0.5):
        kept = fast_nms_boxes(boxes, scores, thresh)
        assert torch.all(scores[kept][:-1] >= scores[kept][1:])
        classic = set(torchvision.ops.nms(boxes, scores, thresh).tolist())
        assert set(kept.tolist()) <= classic


def test_fast_nms_differs_from_classic_on_a_chain():
    # A overlaps B, B overlaps C, A and C disjoint; scores A > B > C.
    boxes = torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [10.0, 0, 20, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert fast_nms_boxes(boxes, scores, 0.2).tolist() == [0]  # suppressed B still kills C
    assert torchvision.ops.nms(boxes, scores, 0.2).tolist() == [0, 2]


def test_threshold_one_keeps_everything_including_exact_duplicates():
    boxes = random_boxes(20, seed=5)
    boxes = torch.cat([boxes, boxes[:3]])  # three exact duplicates, IoU exactly 1.0
    scores = torch.rand(23, generator=torch.Generator().manual_seed(5))
    assert box_iou_matrix(boxes)[0, 20] == 1.0
    assert sorted(fast_nms_boxes(boxes, scores, 1.0).tolist()) == list(range(23))
    # Just below 1.0 the lower-scored copy of each duplicate pair goes.
    kept = set(fast_nms_boxes(boxes, scores, 0.999).tolist())
    for i in range(3):
        lower = i if scores[i] < scores[20 + i] else 20 + i
        assert lower not in kept


def test_threshold_zero_keeps_one_per_clique_cluster():
    # Three far-apart clusters; inside each, every pair of boxes overlaps (all
    # contain the cluster centre), so at threshold 0 only each cluster's best survives.
    g = torch.Generator().manual_seed(0)
    boxes, scores, cluster = [], [], []
    for c, (cx, cy) in enumerate([(50.0, 50.0), (300.0, 80.0), (120.0, 400.0)]):
        for _ in range(6):
            lo = torch.rand(2, generator=g) * 20 + 1
            hi = torch.rand(2, generator=g) * 20 + 1
            boxes.append([cx - lo[0], cy - lo[1], cx + hi[0], cy + hi[1]])
            scores.append(float(torch.rand(1, generator=g)))
            cluster.append(c)
    boxes_t, scores_t = torch.tensor(boxes), torch.tensor(scores)
    iou = box_iou_matrix(boxes_t)
    same = torch.tensor(cluster)[:, None] == torch.tensor(cluster)[None, :]
    assert (iou[same] > 0).all() and (iou[~same] == 0).all()
    kept = fast_nms_boxes(boxes_t, scores_t, 0.0).tolist()
    best = {c: max((s, i) for i, (s, cc) in enumerate(zip(scores, cluster)) if cc == c)[1] for c in range(3)}
    assert sorted(kept) == sorted(best.values())


def test_touching_boxes_do_not_suppress_at_threshold_zero():
    boxes = torch.tensor([[0.0, 0, 10, 10], [10.0, 0, 20, 10]])  # share an edge, IoU 0
    assert fast_nms_boxes(boxes, torch.tensor([0.9, 0.8]), 0.0).tolist() == [0, 1]


def test_ties_are_broken_by_index():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert fast_nms_boxes(boxes, scores, 0.5).tolist() == [0]
    assert fast_nms_boxes(boxes, scores, 1.0).tolist() == [0, 1, 2]


def test_top_k_and_callable_see_only_top_items():
    boxes = random_boxes(30, seed=9)
    scores = torch.rand(30, generator=torch.Generator().manual_seed(9))
    seen = []

    def iou_fn(order):
        seen.append(order.clone())
        return box_iou_matrix(boxes[order])

    got = fast_nms(scores, iou_fn, 0.5, top_k=10)
    top = torch.argsort(scores, descending=True)[:10]
    assert torch.equal(seen[0], top)
    b = boxes[top].tolist()
    s = scores[top].tolist()
    want = [int(top[i]) for i in brute_fast_nms(s, lambda i, j: py_box_iou(b[i], b[j]), 0.5)]
    assert got.tolist() == want
    assert fast_nms(scores, iou_fn, 0.5, top_k=0).numel() == 0


def test_class_ids_make_it_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [0.0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert fast_nms_boxes(boxes, scores, 0.5).tolist() == [0]
    kept = fast_nms_boxes(boxes, scores, 0.5, class_ids=torch.tensor([0, 1, 0]))
    assert kept.tolist() == [0, 1]


def test_fast_nms_input_checks():
    with pytest.raises(ValueError):
        fast_nms(torch.rand(3), torch.rand(2, 2), 0.5)
    with pytest.raises(ValueError):
        fast_nms(torch.rand(3), torch.rand(3, 3), -0.1)
    with pytest.raises(ValueError):
        fast_nms(torch.rand(3, 1), torch.rand(3, 3), 0.5)
