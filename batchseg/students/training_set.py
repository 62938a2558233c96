"""What a student learns from, torch-free: a round's label rows, their source, the images and where they are.

The driver plans a training with these (and a build's rerun finds a student up to
date with them) before torch is imported; ``batchseg.students.data`` re-exports them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from batchseg.errors import UsageError
from batchseg.io.build_info import label_parts
from batchseg.io.statuses import AUTO_SOURCE, SOURCE_PREFERENCE, ImageStatus
from batchseg.io.tables import LABELS_VERSION, check_version, labels_schema, read_manifest, read_part


@dataclass(frozen=True)
class TrainImage:
    """One labelled image: where to read it and its original size."""

    image_id: str
    path: str
    height: int
    width: int


def read_round(out: Path, round_index: int, kind: str) -> pa.Table:
    """Label rows of one round and kind (``semantic`` or ``instance``), every source."""
    tables = []
    for part in label_parts(out, round_index):
        table = read_part(part)
        check_version(table.schema, "labels", LABELS_VERSION, part)
        table = table.cast(labels_schema())
        tables.append(table.filter(pc.equal(table.column("kind"), kind)))
    return pa.concat_tables(tables) if tables else labels_schema().empty_table()


def pick_source(table: pa.Table, requested: str) -> str:
    """The label source to learn from: ``requested``, or for ``auto`` SAM's refinement when present."""
    sources = set(table.column("source").to_pylist())
    if requested != AUTO_SOURCE:
        if requested not in sources:
            raise UsageError(f"the round has no '{requested}' labels (it has: {', '.join(sorted(sources)) or 'none'})")
        return requested
    for choice in SOURCE_PREFERENCE:
        if choice in sources:
            return choice
    raise UsageError("the round has no label rows of this kind")


def source_folders(out: Path) -> dict[str, str]:
    """Embed run id -> the source folder it read (from ``OUT/runs/RUN_ID.json``)."""
    folders = {}
    for record in (out / "runs").glob("*.json"):
        try:
            data = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("command") == "embed" and (data.get("config") or {}).get("source"):
            folders[data["run_id"]] = data["config"]["source"]
    return folders


def train_images(out: Path, image_ids: set[str], images_root: Path | None) -> list[TrainImage]:
    """Where to read each labelled image: its first ``ok`` manifest row, under its embed run's source
    folder (or ``images_root`` when given). Sorted by image id."""
    folders = {} if images_root is not None else source_folders(out)
    found: dict[str, TrainImage] = {}
    missing_runs: set[str] = set()
    for row in read_manifest(out).to_pylist():
        image_id = row["image_id"]
        if row["status"] != ImageStatus.OK or image_id not in image_ids or image_id in found:
            continue
        root = str(images_root) if images_root is not None else folders.get(row["run_id"])
        if root is None:
            missing_runs.add(row["run_id"])
            continue
        found[image_id] = TrainImage(image_id, str(Path(root) / row["path"]), int(row["height"]), int(row["width"]))
    if missing_runs:
        raise UsageError(f"{out}/runs has no record of the embed run(s) {', '.join(sorted(missing_runs)[:3])}, "
                         "so where their images are is unknown; pass --images SRC")
    return [found[k] for k in sorted(found)]


@dataclass(frozen=True)
class DistillImage:
    """One embedded image: where to read it, its stored row, its valid region on SAM's canvas."""

    image: TrainImage
    zarr_row: int
    valid_h: int
    valid_w: int
