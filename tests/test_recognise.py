"""Mask recognition and mask-voted semantic maps against plain loop implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchseg.labels.recognise import mask_class_scores, recognise_masks, refine_semantic


def _probs(c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """``(C, H, W)`` float32 softmax probabilities."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(c, h, w, generator=g) * 2, dim=0)


def _masks(n: int, h: int, w: int, seed: int, density: float = 0.3) -> torch.Tensor:
    """``(N, H, W)`` random bool masks; mask 0 is empty, mask 1 a rectangle."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=g) < density
    m[0] = False
    if n > 1:
        m[1] = False
        m[1, 2:6, 3:9] = True
    return m


def loop_scores(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    c = probs.shape[0]
    out = np.zeros((len(masks), c))
    for i, m in enumerate(masks):
        if m.any():
            for k in range(c):
                out[i, k] = probs[k][m].mean()
    return out


def loop_refine(probs: np.ndarray, masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The documented rule, pixel by pixel."""
    c, h, w = probs.shape
    cls = [int(np.argmax(row)) for row in loop_scores(probs, masks)]
    areas = masks.reshape(len(masks), -1).sum(1)
    out = np.zeros((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            cover = [i for i in range(len(masks)) if masks[i, y, x]]
            if not cover:
                out[y, x] = int(np.argmax(probs[:, y, x]))
                continue
            key = lambda i: (-np.inf if np.isnan(scores[i]) else scores[i], -areas[i], -i)  # noqa: E731
            out[y, x] = cls[max(cover, key=key)]
    return out


@pytest.mark.parametrize("chunk_elems", [1, 300, 2**24])
def test_scores_equal_loop(chunk_elems: int) -> None:
    probs, masks = _probs(5, 12, 17, 0), _masks(9, 12, 17, 1)
    got = mask_class_scores(probs, masks, chunk_elems=chunk_elems)
    assert got.shape == (9, 5) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), loop_scores(probs.numpy(), masks.numpy()), atol=1e-6)
    assert torch.all(got[0] == 0)  # empty mask -> zeros
    np.testing.assert_allclose(got[1:].sum(1).numpy(), 1.0, atol=1e-5)  # mean of distributions


def test_numpy_masks_and_no_masks() -> None:
    probs, masks = _probs(3, 8, 8, 2), _masks(4, 8, 8, 3)
    torch.testing.assert_close(mask_class_scores(probs, masks.numpy()), mask_class_scores(probs, masks))
    assert mask_class_scores(probs, np.zeros((0, 8, 8), bool)).shape == (0, 3)
    ids, scores = recognise_masks(probs, np.zeros((0, 8, 8), bool))
    assert ids.shape == (0,) and scores.shape == (0,)


def test_recognise_equals_argmax_of_loop() -> None:
    probs, masks = _probs(6, 10, 14, 4), _masks(8, 10, 14, 5)
    ref = loop_scores(probs.numpy(), masks.numpy())
    ids, scores = recognise_masks(probs, masks)
    assert ids.dtype == torch.int64 and scores.dtype == torch.float32
    assert ids[0] == -1 and scores[0] == 0  # empty mask
    np.testing.assert_array_equal(ids[1:].numpy(), ref[1:].argmax(1))
    np.testing.assert_allclose(scores.numpy(), ref.max(1), atol=1e-6)


def test_min_score_marks_unrecognised() -> None:
    probs, masks = _probs(6, 10, 14, 4), _masks(8, 10, 14, 5)
    _, scores = recognise_masks(probs, masks)
    cut = float(scores[1:].median())
    ids, scores2 = recognise_masks(probs, masks, min_score=cut)
    torch.testing.assert_close(scores2, scores)  # scores reported either way
    assert torch.all((ids == -1) == ((scores < cut) | (torch.arange(8) == 0)))


def test_refine_equals_loop() -> None:
    probs, masks = _probs(4, 9, 11, 6), _masks(7, 9, 11, 7, density=0.4)
    scores = torch.tensor([0.5, 0.9, 0.1, 0.9, float("nan"), 0.3, 0.7])  # a tie and a NaN
    for chunk in (1, 50, 2**24):
        got = refine_semantic(probs, masks, scores, chunk_elems=chunk)
        assert got.dtype == torch.int64 and got.shape == (9, 11)
        np.testing.assert_array_equal(got.numpy(), loop_refine(probs.numpy(), masks.numpy(), scores.numpy()))


def _two_class_probs(h: int, w: int) -> torch.Tensor:
    """Left half prefers class 0 (0.9), right half class 1 (0.7)."""
    p = torch.zeros(2, h, w)
    p[0, :, : w // 2], p[1, :, : w // 2] = 0.9, 0.1
    p[0, :, w // 2 :], p[1, :, w // 2 :] = 0.3, 0.7
    return p


def test_uncovered_pixels_keep_argmax_and_mask_votes() -> None:
    probs = _two_class_probs(4, 8)
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[0, :2, :6] = True  # 8 px of class-0 territory, 4 px of class-1: mean p0 = 0.7
    out = refine_semantic(probs, mask, torch.tensor([1.0]))
    expected = probs.argmax(0)
    expected[:2, :6] = 0  # the whole mask takes its pooled class
    torch.testing.assert_close(out, expected)
    none = torch.zeros(0, 4, 8, dtype=torch.bool)
    assert refine_semantic(probs, none, torch.zeros(0)).equal(probs.argmax(0))


def test_overlap_rule() -> None:
    probs = _two_class_probs(4, 8)
    big = torch.zeros(4, 8, dtype=torch.bool)
    big[:, :5] = True  # 16 px left, 4 right: mean p0 = 0.78, class 0
    small = torch.zeros(4, 8, dtype=torch.bool)
    small[:, 3:8] = True  # 4 px left, 16 right: mean p0 = 0.42, class 1; overlap: cols 3-4
    masks = torch.stack([big, small])
    # Higher score wins the overlap, whichever is smaller.
    out = refine_semantic(probs, masks, torch.tensor([0.9, 0.5]))
    assert torch.all(out[:, 3:5] == 0) and torch.all(out[:, 5:] == 1)
    out = refine_semantic(probs, masks, torch.tensor([0.5, 0.9]))
    assert torch.all(out[:, 3:5] == 1) and torch.all(out[:, :3] == 0)
    # Equal scores: the smaller mask wins (both are 20 px; drop a row of small).
    small2 = small.clone()
    small2[0] = False  # 15 px < 20 px
    out = refine_semantic(probs, torch.stack([big, small2]), torch.tensor([0.7, 0.7]))
    assert torch.all(out[1:, 3:5] == 1) and torch.all(out[0, 3:5] == 0)
    # Equal scores and areas: the lower index wins.
    out = refine_semantic(probs, masks, torch.tensor([0.7, 0.7]))
    assert torch.all(out[:, 3:5] == 0)
    out = refine_semantic(probs, masks.flip(0), torch.tensor([0.7, 0.7]))
    assert torch.all(out[:, 3:5] == 1)


def test_rejects_mismatched_shapes() -> None:
    probs = _probs(3, 8, 8, 0)
    with pytest.raises(ValueError, match="masks"):
        mask_class_scores(probs, torch.zeros(2, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_scores"):
        refine_semantic(probs, torch.zeros(2, 8, 8, dtype=torch.bool), torch.zeros(3))
    with pytest.raises(ValueError, match="probs"):
        mask_class_scores(probs[0], torch.zeros(2, 8, 8, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    probs, masks = _probs(5, 30, 40, 8), _masks(20, 30, 40, 9)
    scores = torch.rand(20, generator=torch.Generator().manual_seed(1))
    cpu = refine_semantic(probs, masks, scores)
    gpu = refine_semantic(probs.cuda(), masks, scores)  # masks stay on the CPU, moved in chunks
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    torch.testing.assert_close(mask_class_scores(probs.cuda(), masks).cpu(), mask_class_scores(probs, masks))


def _brute_majority(labels: np.ndarray, masks: np.ndarray, num_classes: int) -> tuple[list[int], list[float]]:
    ids, shares = [], []
    for mask in masks:
        votes = [int(((labels == c) & mask).sum()) for c in range(num_classes)]
        total = sum(votes)
        best = max(range(num_classes), key=lambda c: (votes[c], -c)) if total else -1
        ids.append(best)
        shares.append(votes[best] / total if total else 0.0)
    return ids, shares


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_majority_classes_equals_counting_votes(seed):
    from batchseg.labels.recognise import majority_classes

    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 4, size=(9, 11))
    masks = rng.random((6, 9, 11)) < 0.4
    masks[0] = False  # an empty mask
    masks[1] = labels < 0  # a mask over unlabelled pixels only
    ids, shares = majority_classes(torch.from_numpy(labels), masks, 4)
    want_ids, want_shares = _brute_majority(labels, masks, 4)
    assert ids.tolist() == want_ids and ids[0] == -1 and ids[1] == -1
    np.testing.assert_allclose(shares.numpy(), want_shares, rtol=1e-6)


def test_refine_with_given_classes_paints_them_and_skips_classless_masks():
    probs = torch.zeros(3, 4, 4)
    probs[0] = 1.0  # MaskCLIP says class 0 everywhere
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2] = True
    masks[1, 2:] = True
    refined = refine_semantic(probs, masks, np.array([0.9, 0.8]), class_ids=np.array([2, -1]))
    assert refined[:2].eq(2).all() and refined[2:].eq(0).all()
