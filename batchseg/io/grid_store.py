"""The training-target grid of a `pseudolabel` round: ``OUT/selftrain/round=K/grid.zarr``.

Two Zarr v3 arrays, one chunk per image along axis 0 (the image's row in
``embeddings.zarr``): ``label`` (int16, class id per head-grid cell, -1 unlabelled) and
``conf`` (float16, its confidence). Like the embedding store, only the driver creates or
grows the arrays (DESIGN rule 3); each label shard writes its own images' rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from batchseg.io.tables import selftrain_folder

GRID_STORE = "grid.zarr"
# (array, dtype, fill value): an unwritten cell reads as unlabelled with no confidence.
GRID_ARRAYS = (("label", "int16", -1), ("conf", "float16", 0))


def grid_store_path(out: Path, round_index: int) -> Path:
    return selftrain_folder(out, round_index) / GRID_STORE


def ensure_grid_store(out: Path, round_index: int, rows: int, grid: int) -> None:
    """Create the round's grid arrays if missing and grow them to at least ``rows`` rows (driver only)."""
    import zarr  # imported where used: a no-op rerun never opens a store

    group = zarr.open_group(str(grid_store_path(out, round_index)), mode="a", zarr_format=3)
    for name, dtype, fill in GRID_ARRAYS:
        if name in group:
            if group[name].shape[0] < rows:
                group[name].resize((rows, grid, grid))
        else:
            group.create_array(name, shape=(rows, grid, grid), chunks=(1, grid, grid), dtype=dtype, fill_value=fill)


def _stack_rows(array, rows: Sequence[int]) -> np.ndarray:
    return np.stack([np.asarray(array[row]) for row in rows])


class TargetGrid:
    """A round's target grid opened read-only; rows come back in the stored dtypes."""

    def __init__(self, path: Path) -> None:
        import zarr

        self.path = path
        self._group = zarr.open_group(str(path), mode="r")

    @classmethod
    def of_round(cls, out: Path, round_index: int) -> "TargetGrid":
        return cls(grid_store_path(out, round_index))

    def labels(self, rows: Sequence[int]) -> np.ndarray:
        """``(len(rows), G, G)`` int16 class ids, -1 where unlabelled."""
        return _stack_rows(self._group["label"], rows)

    def confidences(self, rows: Sequence[int]) -> np.ndarray:
        """``(len(rows), G, G)`` float16 confidences of :meth:`labels`."""
        return _stack_rows(self._group["conf"], rows)


class TargetGridWriter:
    """A label shard's handle for writing its images' rows into the round's existing grid."""

    def __init__(self, out: Path, round_index: int) -> None:
        import zarr

        self._group = zarr.open_group(str(grid_store_path(out, round_index)), mode="r+")

    def write(self, row: int, label: np.ndarray, confidence: np.ndarray) -> None:
        self._group["label"][row] = label
        self._group["conf"][row] = confidence
