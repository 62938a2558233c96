"""Near-duplicates: the blocked search equals the brute-force pairwise definition; grouping."""
import numpy as np
import pytest

from batchseg.qc.duplicates import brute_force_pairs, group_pairs, normalise_rows, similar_pairs


def _clustered(seed: int, n: int = 157, d: int = 12) -> np.ndarray:
    """Rows in tight clusters (near-duplicates) plus loners and a zero row."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    rows = centres[rng.integers(0, 20, n)] + rng.normal(scale=0.15, size=(n, d))
    rows[5] = 0.0
    return rows.astype(np.float32)


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("threshold", [0.9, 0.98])
def test_blocked_search_equals_brute_force(block, threshold):
    rows = _clustered(0)
    expected = brute_force_pairs(rows, threshold)
    assert 10 < len(expected) < len(rows) ** 2 / 4  # the data has pairs, and not everything pairs
    unit = normalise_rows(rows)
    i, j, sims = similar_pairs(unit, threshold, block=block)
    found = list(zip(i.tolist(), j.tolist()))
    assert len(found) == len(set(found)) and set(found) == expected
    exact = (unit[i] * unit[j]).sum(axis=1)
    np.testing.assert_allclose(sims, exact, atol=1e-5)
    assert all(5 not in pair for pair in found)


@pytest.mark.parametrize("block", [3, 50])
def test_query_subset_finds_every_pair_touching_a_query_once(block):
    rows = _clustered(1)
    queries = [0, 3, 4, 40, 41, 42, 100, 156]
    expected = {p for p in brute_force_pairs(rows, 0.95) if p[0] in queries or p[1] in queries}
    i, j, _ = similar_pairs(normalise_rows(rows), 0.95, queries=queries, block=block)
    found = list(zip(i.tolist(), j.tolist()))
    assert len(found) == len(set(found)) and set(found) == expected


def test_memmap_input_and_progress(tmp_path):
    rows = normalise_rows(_clustered(2))
    stored = np.lib.format.open_memmap(tmp_path / "unit.npy", mode="w+", dtype=np.float32, shape=rows.shape)
    stored[:] = rows
    seen = []
    i, j, _ = similar_pairs(stored, 0.95, block=16, progress=seen.append)
    assert set(zip(i.tolist(), j.tolist())) == brute_force_pairs(rows, 0.95)
    assert sum(seen) == len(rows)


def test_groups_are_components_with_the_earliest_member_kept():
    # 0-1-2 chained, 3-4, 5 alone; order puts 2 first in its group.
    i, j = np.array([0, 1, 3]), np.array([1, 2, 4])
    sims = np.array([0.99, 0.98, 0.97], dtype=np.float32)
    groups = group_pairs(6, i, j, sims, order=np.array([5, 4, 0, 1, 2, 3]))
    assert groups.representative.tolist() == [2, 2, 2, 3, 3, 5]
    np.testing.assert_allclose(groups.similarity[:5], [0.99, 0.99, 0.98, 0.97, 0.97])
    assert np.isnan(groups.similarity[5])
    default_order = group_pairs(6, i, j, sims)
    assert default_order.representative.tolist() == [0, 0, 0, 3, 3, 5]
