"""COCO RLE helpers: exact round trips, bbox/area against numpy, label maps."""
from __future__ import annotations

import json

import numpy as np
import pytest

from batchseg.labels.rle import (
    decode_mask,
    encode_label_map,
    encode_mask,
    encode_masks,
    mask_area,
    mask_bbox_xywh,
    rle_area,
    rle_bbox_xywh,
)


def np_bbox(mask):
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


def edge_masks():
    single = np.zeros((7, 9), bool)
    single[2, 3] = True
    corner = np.zeros((5, 4), bool)
    corner[-1, -1] = True
    first = np.zeros((5, 4), bool)
    first[0, 0] = True
    stripes = np.zeros((6, 11), bool)
    stripes[:, ::2] = True
    return {
        "empty": np.zeros((4, 6), bool),
        "full": np.ones((4, 6), bool),
        "single": single,
        "corner": corner,
        "first": first,
        "stripes": stripes,
        "row": np.ones((1, 13), bool),
        "col": np.ones((13, 1), bool),
        "one_pixel_image": np.ones((1, 1), bool),
        "checker": (np.indices((9, 5)).sum(axis=0) % 2).astype(bool),
    }


def random_masks():
    rng = np.random.default_rng(0)
    out = {}
    for i, (h, w, p) in enumerate([(30, 50, 0.5), (50, 30, 0.1), (17, 23, 0.9), (64, 48, 0.02)]):
        out[f"random{i}"] = rng.random((h, w)) < p
    return out


ALL = {**edge_masks(), **random_masks()}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("order", ["C", "F"])
def test_round_trip_is_exact(name, order):
    mask = np.array(ALL[name], order=order)
    rle = encode_mask(mask)
    assert rle["size"] == [mask.shape[0], mask.shape[1]]
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # goes into Parquet/JSON as is
    back = decode_mask(rle)
    assert back.dtype == np.bool_ and back.shape == mask.shape and back.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(back, mask)
    # bytes counts (as pycocotools returns them) decode too
    np.testing.assert_array_equal(decode_mask({**rle, "counts": rle["counts"].encode()}), mask)


@pytest.mark.parametrize("name", sorted(ALL))
def test_encoding_does_not_depend_on_memory_order_or_dtype(name):
    mask = ALL[name]
    ref = encode_mask(mask)
    assert encode_mask(np.asfortranarray(mask)) == ref
    assert encode_mask(mask.astype(np.uint8)) == ref
    assert encode_mask(mask.T.copy().T) == ref  # Fortran-ordered copy via transposes
    assert encode_mask(np.ascontiguousarray(mask[:, ::-1])[:, ::-1]) == ref  # negative strides


@pytest.mark.parametrize("name", sorted(ALL))
def test_bbox_and_area_agree_with_numpy(name):
    mask = ALL[name]
    assert mask_area(mask) == int(mask.sum())
    assert isinstance(mask_area(mask), int)
    assert mask_bbox_xywh(mask) == np_bbox(mask)
    rle = encode_mask(mask)
    assert rle_area(rle) == int(mask.sum())
    assert rle_bbox_xywh(rle) == np_bbox(mask)


def test_single_pixel_bbox_convention():
    assert mask_bbox_xywh(edge_masks()["single"]) == (3.0, 2.0, 1.0, 1.0)


def test_encode_masks_matches_one_by_one():
    rng = np.random.default_rng(3)
    masks = rng.random((5, 13, 7)) < 0.4
    masks[2] = False
    assert encode_masks(masks) == [encode_mask(m) for m in masks]
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []


@pytest.mark.parametrize(
    "bad",
    [np.zeros((3,), bool), np.zeros((2, 3, 4), bool), np.zeros((0, 5), bool), np.full((2, 2), 0.5)],
)
def test_encode_mask_rejects_bad_input(bad):
    with pytest.raises((ValueError, TypeError)):
        encode_mask(bad)


def test_integer_mask_must_be_binary():
    with pytest.raises(ValueError):
        encode_mask(np.array([[0, 2]], dtype=np.int64))


@pytest.mark.parametrize("ignore", [-1, 255])
@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (1, 1), (8, 8)])
def test_label_map_rows_are_disjoint_and_cover_non_ignored(shape, ignore):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    lm = rng.integers(0, 6, size=shape)
    lm[rng.random(shape) < 0.2] = ignore
    lm[lm == 3] = 4  # a vocabulary class that is absent
    rows = encode_label_map(lm, ignore=ignore)
    ids = [c for c, _ in rows]
    assert ids == sorted(set(np.unique(lm).tolist()) - {ignore})
    assert 3 not in ids
    union = np.zeros(shape, int)
    for c, rle in rows:
        m = decode_mask(rle)
        np.testing.assert_array_equal(m, lm == c)
        union += m
    assert union.max() <= 1  # disjoint
    np.testing.assert_array_equal(union.astype(bool), lm != ignore)


def test_label_map_all_ignored_and_single_class():
    assert encode_label_map(np.full((4, 5), -1)) == []
    rows = encode_label_map(np.full((4, 5), 7, dtype=np.uint8), ignore=255)
    assert [c for c, _ in rows] == [7]
    assert decode_mask(rows[0][1]).all()


def test_label_map_rejects_bad_input():
    with pytest.raises(TypeError):
        encode_label_map(np.zeros((3, 3), float))
    with pytest.raises(ValueError):
        encode_label_map(np.zeros((3, 3, 1), int))
