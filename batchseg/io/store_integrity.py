"""Stored embeddings are checked when read, never trusted blindly.

Every chunk of ``embeddings.zarr`` (one image's row of one array) carries a CRC32C of
its compressed bytes (zarr's ``crc32c`` codec, the last codec of each array), so a flipped
byte fails to decode instead of being read back as other numbers. A missing chunk is
read back by Zarr as its fill value (zeros); the manifest says the row is ``ok``, so
batchseg treats a missing chunk as damage too (arrays are written with
``write_empty_chunks``, so even an all-zero row has its chunk).

Stores written before checksums (their arrays lack the ``crc32c`` codec) are checked as
far as they can be: missing chunks and chunks that no longer decode are found, a byte
flipped into a still-decodable zstd frame is not. ``embed --verify`` says so; an
``embed --overwrite`` rewrites them with checksums.
"""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from batchseg.errors import BatchsegError
from batchseg.io.store import ROW_ID_ARRAY, store_path

if TYPE_CHECKING:  # zarr takes seconds to import under load; imported where the store is used
    import zarr

CHECKSUM_CODEC = "crc32c"
# What a damaged chunk raises inside zarr/numcodecs: a checksum mismatch is a ValueError,
# a frame that zstd cannot decode a RuntimeError or ValueError, a truncated file any of them.
_DECODE_ERRORS = (ValueError, RuntimeError, OSError, EOFError, TypeError, IndexError)
VERIFY_HINT = "run `batchseg embed SRC OUT --verify` to recompute damaged rows"


class DamagedRowError(BatchsegError):
    """A stored row (one image's chunk of one array) is missing or fails its checksum."""

    def __init__(self, message: str, array: str | None = None, row: int | None = None) -> None:
        super().__init__(message)
        self.array, self.row = array, row

    def __reduce__(self):  # keep the fields when Dask sends the error from a worker
        return (type(self), (str(self), self.array, self.row))


def has_checksums(array: zarr.Array) -> bool:
    """Whether the array's chunks carry a checksum (written by this batchseg or later)."""
    return any(getattr(codec, "to_dict", lambda: {})().get("name") == CHECKSUM_CODEC for codec in array.metadata.codecs)


def chunk_file(out: Path, array: zarr.Array, row: int) -> Path:
    """The file holding ``row`` of ``array`` (one chunk per row, a local store)."""
    key = array.metadata.encode_chunk_key((row,) + (0,) * (array.ndim - 1))
    return store_path(out) / array.path / key


def row_damage(out: Path, array: zarr.Array, row: int) -> str | None:
    """Why ``row`` of ``array`` cannot be trusted, or None when it reads back intact."""
    if not chunk_file(out, array, row).is_file():
        return "its chunk file is missing"
    try:
        np.asarray(array[row])
    except _DECODE_ERRORS as exc:
        return f"its chunk does not decode ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def damaged_message(out: Path, name: str, row: int, reason: str, image_id: str | None = None) -> str:
    who = f" (image {image_id})" if image_id else ""
    return f"{store_path(out) / name} row {row}{who} is damaged: {reason}; {VERIFY_HINT}"


def read_row_checked(out: Path, group: zarr.Group, name: str, row: int, image_id: str | None = None) -> np.ndarray:
    """One stored row, or ``DamagedRowError`` when its chunk is missing or fails to decode."""
    array = group[name]
    if not chunk_file(out, array, row).is_file():
        raise DamagedRowError(damaged_message(out, name, row, "its chunk file is missing", image_id), name, row)
    try:
        return np.asarray(array[row])
    except _DECODE_ERRORS as exc:
        reason = f"its chunk does not decode ({type(exc).__name__}: {str(exc)[:120]})"
        raise DamagedRowError(damaged_message(out, name, row, reason, image_id), name, row) from None


def check_rows_present(out: Path, array: zarr.Array, rows: Iterable[int]) -> None:
    """``DamagedRowError`` for the first of ``rows`` whose chunk file is missing (a stat per row)."""
    for row in rows:
        if not chunk_file(out, array, int(row)).is_file():
            raise DamagedRowError(damaged_message(out, array.basename, int(row), "its chunk file is missing"),
                                  array.basename, int(row))


def verify_rows(out: Path, rows: Iterable[int], names: Iterable[str] | None = None,
                threads: int = 4) -> dict[int, str]:
    """Read every chunk of ``rows`` in every embedding array (or ``names``); damaged row -> reason.

    The row owners (``image_id``) are left out: stores older than them have none for
    their first rows, and an owner is only a hint (a repair recomputes a row without one).

    Chunks are decoded in threads (zstd and the checksum release the GIL); memory is a
    few rows at a time.
    """
    import zarr
    group = zarr.open_group(str(store_path(out)), mode="r")
    names = names or sorted(name for name in group.array_keys() if name != ROW_ID_ARRAY)
    arrays = [group[name] for name in names]
    jobs = [(array, int(row)) for row in sorted(set(rows)) for array in arrays if int(row) < array.shape[0]]
    damaged: dict[int, str] = {}
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="verify") as pool:
        for (array, row), reason in zip(jobs, pool.map(lambda job: row_damage(out, *job), jobs)):
            if reason is not None and row not in damaged:
                damaged[row] = f"{array.basename}: {reason}"
    return damaged


def arrays_without_checksums(out: Path) -> list[str]:
    """Names of the store's arrays written before chunks carried checksums."""
    path = store_path(out)
    if not path.exists():
        return []
    import zarr
    group = zarr.open_group(str(path), mode="r")
    return sorted(name for name in group.array_keys() if not has_checksums(group[name]))
