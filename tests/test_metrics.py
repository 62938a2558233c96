"""Confusion-matrix metrics against a brute-force per-pixel count."""
import math

import numpy as np
import pytest

from batchseg.labels.metrics import confusion, scores_from_confusion


def brute_force(pred, gt, k, ignore):
    """IoU per class, mIoU over classes present in gt, pixel accuracy, by looping over pixels."""
    tp, fp, fn, gt_count = [0] * k, [0] * k, [0] * k, [0] * k
    correct = total = 0
    for p, g in zip(np.asarray(pred).ravel().tolist(), np.asarray(gt).ravel().tolist()):
        if ignore is not None and g == ignore:
            continue
        total += 1
        gt_count[g] += 1
        if p == g:
            tp[g] += 1
            correct += 1
        else:
            fn[g] += 1
            if p >= 0:
                fp[p] += 1
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if gt_count[c] else math.nan for c in range(k)]
    present = [v for c, v in enumerate(iou) if gt_count[c]]
    miou = sum(present) / len(present) if present else math.nan
    return iou, miou, (correct / total if total else math.nan)


CASES = {
    "perfect": ([[0, 1], [1, 2]], [[0, 1], [1, 2]], 3, 255),
    "all wrong": ([[1, 1], [0, 0]], [[0, 0], [1, 1]], 2, 255),
    "ignore value": ([[0, 1, 1], [2, 2, 0]], [[0, 255, 1], [255, 2, 2]], 3, 255),
    # class 2 is predicted but absent from gt: nan IoU, out of mIoU; its pixels still hurt class 0
    "predicted, absent from gt": ([[2, 2, 0], [1, 1, 0]], [[0, 0, 0], [1, 1, 0]], 3, 255),
    # class 3 neither predicted nor in gt
    "absent from both": ([[0, 1], [1, 1]], [[0, 1], [0, 1]], 4, 255),
    "unlabelled predictions": ([[-1, 0, 1], [-1, -1, 1]], [[0, 0, 1], [1, 2, 1]], 3, 255),
    "ignore -1": ([[0, 1], [1, 0]], [[-1, 1], [0, 0]], 2, -1),
    "no ignore": ([[0, 1, 1, 0]], [[0, 0, 1, 1]], 2, None),
    "everything ignored": ([[0, 1]], [[255, 255]], 2, 255),
}


def _random_case(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 6))
    gt = rng.integers(0, k, size=(7, 9))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(-1, k, size=(7, 9))
    return pred, gt, k, 255


@pytest.mark.parametrize("pred,gt,k,ignore", list(CASES.values()) + [_random_case(s) for s in range(5)],
                         ids=list(CASES) + [f"random{s}" for s in range(5)])
def test_scores_equal_brute_force(pred, gt, k, ignore):
    conf = confusion(np.array(pred), np.array(gt), k, ignore)
    assert conf.shape == (k, k + 1) and conf.dtype == np.int64
    scores = scores_from_confusion(conf)
    iou, miou, acc = brute_force(pred, gt, k, ignore)
    np.testing.assert_allclose(scores.iou, iou, equal_nan=True)
    np.testing.assert_allclose(scores.miou, miou, equal_nan=True)
    np.testing.assert_allclose(scores.pixel_accuracy, acc, equal_nan=True)
    gt_arr = np.array(gt)
    counted = gt_arr != ignore if ignore is not None else np.ones(gt_arr.shape, bool)
    assert scores.total_pixels == counted.sum()
    assert scores.unlabelled_pixels == (counted & (np.array(pred) == -1)).sum()


def test_hand_computed_values():
    pred = np.array([[2, 2, 0], [1, 1, 0]])
    gt = np.array([[0, 0, 0], [1, 1, 0]])
    scores = scores_from_confusion(confusion(pred, gt, 3))
    assert scores.iou[0] == pytest.approx(2 / 4)  # tp 2; fn 2 (predicted as class 2)
    assert scores.iou[1] == 1.0
    assert math.isnan(scores.iou[2])
    assert scores.miou == pytest.approx(0.75)
    assert scores.pixel_accuracy == pytest.approx(4 / 6)
    assert scores.pred_pixels.tolist() == [2, 2, 2]


def test_confusions_add_over_images():
    a = (np.array([[0, 1]]), np.array([[0, 0]]))
    b = (np.array([[1, 1, -1]]), np.array([[1, 1, 1]]))
    summed = confusion(*a, 2) + confusion(*b, 2)
    joined = confusion(np.array([[0, 1, 1, 1, -1]]), np.array([[0, 0, 1, 1, 1]]), 2)
    np.testing.assert_array_equal(summed, joined)


def test_square_confusion_accepted():
    scores = scores_from_confusion(np.array([[3, 1], [0, 4]]))
    assert scores.iou.tolist() == pytest.approx([3 / 4, 4 / 5])
    assert scores.unlabelled_pixels == 0


@pytest.mark.parametrize("pred,gt,k", [
    ([[0, 3]], [[0, 1]], 3),  # prediction out of range
    ([[0, -2]], [[0, 1]], 3),  # prediction below -1
    ([[0, 1]], [[0, 7]], 3),  # gt out of range and not ignore
    ([[0, 1]], [[0, 1, 1]], 3),  # shapes differ
])
def test_bad_input(pred, gt, k):
    with pytest.raises(ValueError):
        confusion(np.array(pred), np.array(gt), k)
