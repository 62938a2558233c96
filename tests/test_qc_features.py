"""qc feature vectors from stored CLIP arrays: valid region only, unit length, layout kept by dense-grid."""
import numpy as np
import pytest

from batchseg.qc.features import compute_features, grid_slices, valid_cells


@pytest.mark.parametrize("valid,expected", [(None, 8), (128, 8), (64, 4), (65, 5), (1, 1), (0, 1)])
def test_valid_cells_cover_the_valid_region(valid, expected):
    assert valid_cells(valid, canvas=128, grid=8) == expected


def test_dense_mean_averages_the_valid_cells_only():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(2, 5, 8, 8)).astype(np.float32)
    dense[0, :, 4:, :] = 100.0  # padding below a half-height image must not count
    got = compute_features("dense-mean", dense, [(64, 128), (None, None)], canvas=128, grid=8)
    expected = np.stack([dense[0, :, :4, :].mean(axis=(1, 2)), dense[1].mean(axis=(1, 2))])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_dense_grid_keeps_the_layout():
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    flipped = dense[:, :, ::-1, :].copy()  # same cells, other arrangement
    grid = compute_features("dense-grid", np.concatenate([dense, flipped]), [(None, None)] * 2, 128, 8)
    mean = compute_features("dense-mean", np.concatenate([dense, flipped]), [(None, None)] * 2, 128, 8)
    assert grid.shape == (2, 48) and mean.shape == (2, 3)
    assert mean[0] @ mean[1] == pytest.approx(1.0, abs=1e-5)
    assert grid[0] @ grid[1] < 0.99


def test_global_is_normalised_and_unknown_names_refused():
    rows = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16)
    np.testing.assert_allclose(compute_features("global", rows, [], 0, 0), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-3)
    with pytest.raises(ValueError, match="unknown feature"):
        compute_features("pixels", np.zeros((1, 2, 2, 2)), [(None, None)], 16, 2)


@pytest.mark.parametrize("cells", [1, 2, 3, 4, 5, 8])
def test_grid_slices_are_four_non_empty_ranges_covering_the_cells(cells):
    slices = grid_slices(cells)
    assert len(slices) == 4 and all(s.stop > s.start >= 0 and s.stop <= cells for s in slices)
    assert set().union(*(range(s.start, s.stop) for s in slices)) == set(range(cells))
