"""Student training data: label rasterisation, letterboxing and seeded augmentation."""
import numpy as np
import torch

from batchseg.labels.rle import encode_mask
from batchseg.students.data import IGNORE, Augment, augment, letterbox_tensors, rasterise
from batchseg.students.instance_data import masks_to_boxes


def _row(mask: np.ndarray, class_id: int, score: float) -> dict:
    return {"image_id": "x", "class_id": class_id, "score": score, "mask": encode_mask(mask)}


def test_rasterise_maps_classes_and_ignores_low_confidence_and_unmapped_rows():
    a = np.zeros((4, 5), dtype=bool)
    a[:2, :2] = True
    b = np.zeros((4, 5), dtype=bool)
    b[2:, :] = True
    c = np.zeros((4, 5), dtype=bool)
    c[0, 4] = True
    rows = [_row(a, 0, 0.9), _row(b, 1, 0.3), _row(c, 5, 0.9)]
    target = rasterise(rows, 4, 5, class_map={0: 2, 1: 0}, conf_thresh=0.5, unlabelled=7)
    expected = np.full((4, 5), 7)
    expected[:2, :2] = 2  # class 0 -> student output 2
    expected[2:, :] = IGNORE  # below the confidence threshold
    expected[0, 4] = IGNORE  # class 5 is not one of the student's classes
    np.testing.assert_array_equal(target, expected)


def test_letterbox_keeps_the_aspect_and_pads_with_ignore():
    pixels = np.full((30, 60, 3), 200, dtype=np.uint8)
    target = np.ones((30, 60), dtype=np.int64)
    image, labels, valid = letterbox_tensors(pixels, 32, target)
    assert valid == (16, 32) and image.shape == (3, 32, 32)
    assert (image[:, :16] == 200).all() and (image[:, 16:] == 0).all()
    assert (labels[:16] == 1).all() and (labels[16:] == IGNORE).all()


def test_augmentation_is_a_function_of_the_seed_and_keeps_pixels_and_labels_aligned():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 4:12, 20:28] = 255
    target = torch.zeros(32, 32, dtype=torch.int64)
    target[4:12, 20:28] = 3
    settings = Augment(flip=True, scale=(0.6, 1.4))
    seen = set()
    for seed in range(12):
        out_a, tgt_a = augment(image, target, np.random.default_rng([0, 1, seed]), settings)
        out_b, tgt_b = augment(image, target, np.random.default_rng([0, 1, seed]), settings)
        assert torch.equal(out_a, out_b) and torch.equal(tgt_a, tgt_b)
        assert out_a.shape == (3, 32, 32) and tgt_a.shape == (32, 32)
        bright, labelled = out_a[0] > 127, tgt_a == 3
        assert bright.any() == labelled.any()
        if labelled.any():  # bilinear pixels vs nearest labels: the same place, edges within a pixel
            inter, union = (bright & labelled).sum(), (bright | labelled).sum()
            assert inter / union > 0.6
            box_a, box_b = masks_to_boxes(bright[None])[0], masks_to_boxes(labelled[None])[0]
            assert (box_a - box_b).abs().max() <= 1
        seen.add(int(masks_to_boxes(bright[None])[0, 0]) if bright.any() else -1)
    assert len(seen) > 3  # the object moved around: flips and scales happened
