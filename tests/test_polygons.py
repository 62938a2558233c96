"""Polygons from masks (batchseg.export.polygons) against the masks themselves."""
import numpy as np
import pytest

from batchseg.export.polygons import mask_polygons, merge_polygons, rasterise
from batchseg.world import render_sample


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _shapes():
    yy, xx = np.mgrid[:60, :70]
    disk = (yy - 30) ** 2 + (xx - 35) ** 2 <= 20**2
    ell = np.zeros((60, 70), dtype=bool)
    ell[5:55, 5:20] = True
    ell[40:55, 5:65] = True  # concave
    diagonal = np.eye(60, 70, dtype=bool) | np.eye(60, 70, k=1, dtype=bool)  # two pixels thick, 8-connected steps
    return {"disk": disk, "ell": ell, "diagonal": diagonal}


@pytest.mark.parametrize("name", ["disk", "ell", "diagonal"])
def test_unsimplified_outline_fills_back_to_the_mask_exactly(name):
    mask = _shapes()[name]
    polygons = mask_polygons(mask, tolerance=0)
    assert len(polygons) == 1
    np.testing.assert_array_equal(rasterise(polygons, *mask.shape), mask)


def test_holes_are_cut_out_of_one_polygon_per_component():
    yy, xx = np.mgrid[:60, :70]
    ring = _shapes()["disk"] & ~((yy - 30) ** 2 + (xx - 35) ** 2 <= 8**2)
    ring[28:33, 5:9] = False  # a second hole
    polygons = mask_polygons(ring, tolerance=0)
    assert len(polygons) == 1
    np.testing.assert_array_equal(rasterise(polygons, 60, 70), ring)
    simplified = mask_polygons(ring, tolerance=1.0)
    assert len(simplified[0]) < len(polygons[0]) / 3 and _iou(rasterise(simplified, 60, 70), ring) >= 0.95


def test_world_objects_keep_iou_above_0_9_at_the_default_tolerance():
    ious = [_iou(rasterise([merge_polygons(mask_polygons(o.mask))], *o.mask.shape), o.mask)
            for seed in (3, 7) for index in range(60) for o in render_sample(seed, index).objects]
    assert len(ious) > 200 and min(ious) >= 0.9 and np.mean(ious) >= 0.96


@pytest.mark.parametrize("tolerance", [0.5, 1.0, 2.0])
def test_tolerance_trades_vertices_for_iou(tolerance):
    mask = np.zeros((80, 90), dtype=bool)
    yy, xx = np.mgrid[:80, :90]
    mask[(yy - 40) ** 2 + (xx - 45) ** 2 <= 30**2] = True
    exact = mask_polygons(mask, tolerance=0)[0]
    simple = mask_polygons(mask, tolerance=tolerance)[0]
    assert len(simple) < len(exact) / 3
    assert _iou(rasterise([simple], 80, 90), mask) >= 0.95  # polygons.MIN_IOU


def test_components_largest_first_and_tiny_ones_dropped():
    mask = np.zeros((30, 30), dtype=bool)
    mask[2:6, 2:6] = True  # 16 px
    mask[10:25, 10:25] = True  # 225 px
    mask[28, 28] = True  # 1 px
    polygons = mask_polygons(mask, tolerance=0, min_area=2)
    assert len(polygons) == 2
    assert rasterise(polygons[:1], 30, 30).sum() == 225
    assert len(mask_polygons(mask, tolerance=0)) == 3
    single = mask_polygons(np.pad(np.ones((1, 1), bool), 3), tolerance=1)
    assert len(single) == 1 and len(single[0]) >= 3


def test_merged_pieces_cover_both_with_a_thin_bridge():
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:15, 5:15] = True
    mask[20:35, 40:55] = True
    merged = merge_polygons(mask_polygons(mask, tolerance=0))
    filled = rasterise([merged], 40, 60)
    assert (filled & mask).sum() == mask.sum()
    assert 0 < (filled & ~mask).sum() <= 2 * 40  # the bridge: about one pixel wide
    with pytest.raises(ValueError):
        merge_polygons([])
