"""NOH-NMS against a plain-Python loop over its definition, and its limiting cases."""
import math
import random

import pytest
import torch

from batchseg.students.noh_nms import noh_nms


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brute(boxes, scores, nearby, nearby_scores, thresh, sigma, floor):
    current = list(scores)
    remaining = set(range(len(boxes)))
    kept = []
    while remaining:
        m = max(sorted(remaining), key=lambda i: current[i])  # first index among ties
        if current[m] <= floor:
            break
        kept.append((m, current[m]))
        remaining.discard(m)
        for i in remaining:
            if _iou(boxes[m], boxes[i]) > thresh:
                d = 1.0 - _iou(nearby[m], boxes[i])
                current[i] *= nearby_scores[m] * math.exp(-d * d / (2 * sigma * sigma))
    return kept


def _random_scene(rng: random.Random, n: int):
    boxes, nearby = [], []
    for _ in range(n):
        x, y = rng.uniform(0, 40), rng.uniform(0, 40)
        w, h = rng.uniform(5, 20), rng.uniform(5, 20)
        boxes.append([x, y, x + w, y + h])
        dx, dy = rng.uniform(-8, 8), rng.uniform(-8, 8)
        nearby.append([x + dx, y + dy, x + dx + w, y + dy + h])
    scores = [rng.random() for _ in range(n)]
    nearby_scores = [rng.random() for _ in range(n)]
    return boxes, scores, nearby, nearby_scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thresh, floor", [(0.3, 0.0), (0.5, 0.05), (0.0, 0.01)])
def test_matches_the_brute_force_definition(seed, thresh, floor):
    rng = random.Random(seed)
    boxes, scores, nearby, nearby_scores = _random_scene(rng, 25)
    kept, kept_scores = noh_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(nearby),
                                torch.tensor(nearby_scores), thresh, sigma=0.2, score_floor=floor)
    expected = _brute(boxes, scores, nearby, nearby_scores, thresh, 0.2, floor)
    assert kept.tolist() == [m for m, _ in expected]
    assert kept_scores.tolist() == pytest.approx([s for _, s in expected], rel=1e-4, abs=1e-6)


def test_no_nearby_objects_is_greedy_nms():
    rng = random.Random(7)
    boxes, scores, nearby, _ = _random_scene(rng, 30)
    kept, _ = noh_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(nearby), torch.zeros(30), 0.5)
    from torchvision.ops import nms

    assert kept.tolist() == nms(torch.tensor(boxes), torch.tensor(scores), 0.5).tolist()


def test_a_box_where_the_neighbour_is_hallucinated_keeps_its_score():
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [1, 0, 11, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    nearby = torch.tensor([[4.0, 0, 14, 10], [0, 0, 1, 1], [0, 0, 1, 1]])  # box 0 expects box 1 next to it
    kept, kept_scores = noh_nms(boxes, scores, nearby, torch.tensor([1.0, 0.0, 0.0]), 0.3, score_floor=0.05)
    assert kept.tolist() == [0, 1]  # box 1 survives its 0.43 IoU with box 0; box 2 (a duplicate) does not
    assert kept_scores[1] == pytest.approx(0.8)
