"""The driver's plan for `embed`: which files are new, which content is new, which rows to use.

Incremental by default (DESIGN rule 4): a file whose (path, size, mtime) is already in
the manifest is not even read again; a new or changed file is hashed, and only content
whose SHA-256 has no committed row is computed. So a rerun's cost grows with the new
files, not with the dataset.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from batchseg.io.images import FoundFile, ImageError, content_id, read_image_bytes
from batchseg.io.statuses import ImageStatus
from batchseg.io.store import row_owners, store_rows
from batchseg.io.store_integrity import verify_rows


CURRENT_RUN_FILE = ".current_run"  # the run id shards check before committing (a stale run stops)


@dataclass(frozen=True)
class ShardItem:
    """One unique image to compute; ``zarr_row`` was assigned by the driver."""

    image_id: str
    path: str | bytes
    rel_path: str
    size: int | None
    mtime: float | None
    zarr_row: int
    reuse: bool = False  # the row already holds this image intact (embed --repair): decode for the row only


def part_path(out: Path, shard_id: str) -> Path:
    return out / "manifest" / f"part-{shard_id}.parquet"


@dataclass(frozen=True)
class PendingImage:
    image_id: str
    found: FoundFile
    zarr_row: int | None = None  # a damaged row recomputed in place (--verify), or an intact one kept (--repair)
    reuse: bool = False  # the row already holds this image, intact: record it, compute nothing


@dataclass
class EmbedPlan:
    """What this run must do; ``recorded_rows`` are manifest rows the driver writes itself."""

    found: int = 0
    known: int = 0  # files unchanged since an earlier run: nothing to do
    duplicates: int = 0  # files whose content is already stored or queued
    pending: list[PendingImage] = field(default_factory=list)
    recorded_rows: list[dict] = field(default_factory=list)


def _stat_key(path: str, size: int | None, mtime: float | None) -> tuple:
    return (path, size, None if mtime is None else round(mtime, 6))


def _hash_file(found: FoundFile) -> tuple[str | None, ImageError | None]:
    try:
        return content_id(read_image_bytes(found.path)), None
    except ImageError as exc:
        return None, exc


def plan_embed(files: Iterable[FoundFile], manifest: pa.Table, run_id: str, hash_threads: int = 4,
               recompute: dict[str, int] | None = None) -> EmbedPlan:
    """Compare discovered files with the committed manifest and decide what to compute.

    ``recompute`` (image id -> its Zarr row) names stored images whose rows are damaged:
    the files recorded with that content are hashed again and, while they still hold it,
    the first one is computed again into the same row.
    """
    recompute = recompute or {}
    rows = manifest.select(["image_id", "path", "bytes", "mtime", "status"]).to_pylist()
    known_keys = {_stat_key(r["path"], r["bytes"], r["mtime"]) for r in rows}
    damaged_paths = {r["path"] for r in rows if r["image_id"] in recompute}
    stored_paths: dict[str, str] = {}
    for r in rows:
        if r["image_id"] is not None and r["status"] != ImageStatus.DUPLICATE:
            stored_paths.setdefault(r["image_id"], r["path"])

    plan = EmbedPlan()
    to_hash: list[FoundFile] = []
    for found in files:
        plan.found += 1
        if _stat_key(found.rel_path, found.size, found.mtime) in known_keys and found.rel_path not in damaged_paths:
            plan.known += 1
        elif found.status is not None:
            plan.recorded_rows.append(_row(found, run_id, None, found.status, found.message))
        else:
            to_hash.append(found)

    # Reading is I/O bound and hashlib releases the GIL: threads hash in parallel.
    with ThreadPoolExecutor(max(1, hash_threads), thread_name_prefix="hash") as pool:
        hashed = list(pool.map(_hash_file, to_hash))

    queued: dict[str, str] = {}
    for found, (image_id, error) in zip(to_hash, hashed):
        if error is not None:
            plan.recorded_rows.append(_row(found, run_id, None, error.status, error.message))
            continue
        if image_id in recompute:
            if image_id not in queued:  # the first file still holding it: recompute into its own row
                queued[image_id] = found.rel_path
                plan.pending.append(PendingImage(image_id, found, recompute[image_id]))
                continue
            if _stat_key(found.rel_path, found.size, found.mtime) in known_keys:
                plan.known += 1  # another recorded copy: its duplicate row stands
                continue
        original = stored_paths.get(image_id) or queued.get(image_id)
        if original is not None:
            plan.duplicates += 1
            plan.recorded_rows.append(
                _row(found, run_id, image_id, ImageStatus.DUPLICATE, f"same content as {original}; computed once")
            )
            continue
        queued[image_id] = found.rel_path
        plan.pending.append(PendingImage(image_id=image_id, found=found))
    return plan


def _row(found: FoundFile, run_id: str, image_id: str | None, status: str, message: str | None) -> dict:
    return {
        "image_id": image_id,
        "path": found.rel_path,
        "bytes": found.size,
        "mtime": found.mtime,
        "status": status,
        "error": message,
        "zarr_row": None,
        "shard": f"{run_id}-driver",
        "run_id": run_id,
    }


def assign_rows(pending: list[PendingImage], manifest: pa.Table, store_rows: int) -> tuple[list[ShardItem], int]:
    """Give each pending image a Zarr row; return the items and the rows the arrays need.

    Rows no committed manifest row points at (left by an interrupted run, or by images
    that failed to decode) are reused first, so a crash and a rerun end with the same
    array size as one clean run.
    """
    used = {row for row in manifest.column("zarr_row").to_pylist() if row is not None}
    used.update(image.zarr_row for image in pending if image.zarr_row is not None)
    free = (row for row in range(store_rows) if row not in used)
    items = []
    next_new = store_rows
    for image in pending:
        row = image.zarr_row if image.zarr_row is not None else next(free, None)
        if row is None:
            row, next_new = next_new, next_new + 1
        found = image.found
        items.append(ShardItem(image.image_id, found.path, found.rel_path, found.size, found.mtime, row, image.reuse))
    return items, max(store_rows, next_new)


def shard_items(items: list[ShardItem], shard_size: int) -> list[tuple[ShardItem, ...]]:
    return [tuple(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def adopt_intact_rows(out: Path, pending: list[PendingImage], manifest: pa.Table) -> int:
    """Match pending images to stored rows no manifest row points at (`embed --repair`).

    A row whose stored owner (``image_id`` array) is the pending image's content id and
    whose chunks all read back intact keeps its embeddings: the image is recorded, not
    computed. ``pending`` is updated in place; returns how many were matched.
    """
    total = store_rows(out)
    used = {row for row in manifest.column("zarr_row").to_pylist() if row is not None}
    owners: dict[str, int] = {}
    for row, owner in sorted(row_owners(out, (row for row in range(total) if row not in used)).items()):
        owners.setdefault(owner, row)
    candidates = {image.image_id: owners[image.image_id] for image in pending if image.image_id in owners}
    damaged = verify_rows(out, candidates.values())
    adopted = 0
    for index, image in enumerate(pending):
        row = candidates.get(image.image_id)
        if row is not None and row not in damaged and image.zarr_row is None:
            pending[index] = dataclasses.replace(image, zarr_row=row, reuse=True)
            adopted += 1
    return adopted
