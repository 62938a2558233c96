"""The driver's plan for `qc`: the build's current files, their stored rows, what is new.

A file is current when its path's latest manifest row is ``ok`` or ``duplicate``;
its embedding is the row of the ``ok`` manifest row with the same image id (the bytes
are embedded once). A file is new for qc when it has no qc row made by the current
model (so a rerun after an interrupted ``--refit`` rescoring finishes the job).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from batchseg.io.statuses import USABLE_STATUSES, ImageStatus


@dataclass(frozen=True)
class QcFile:
    path: str
    image_id: str
    exact_duplicate_of: str | None  # the path whose identical bytes were embedded, for duplicates


@dataclass
class QcPlan:
    files: list[QcFile] = field(default_factory=list)  # every current file, manifest order
    image_ids: list[str] = field(default_factory=list)  # unique embedded images, oldest first
    zarr_rows: list[int] = field(default_factory=list)  # their rows in embeddings.zarr
    valid_hw: list[tuple[int | None, int | None]] = field(default_factory=list)  # valid region on the CLIP canvas
    new_files: list[QcFile] = field(default_factory=list)
    new_images: list[int] = field(default_factory=list)  # indices into image_ids, ascending

    @property
    def index(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.image_ids)}


def plan_qc(manifest: pa.Table, qc_rows: pa.Table, model_id: str | None) -> QcPlan:
    """Compare the manifest with the qc rows of ``model_id`` (None: everything is new)."""
    rows = manifest.select(["image_id", "path", "status", "zarr_row", "run_id", "clip_valid_h", "clip_valid_w"]).to_pylist()
    rows.sort(key=lambda r: r["run_id"] or "")  # stable: manifest order within a run
    embedded: dict[str, tuple[int, str, tuple]] = {}  # image id -> (zarr row, path, valid h/w) of its first ok row
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["path"]] = row
        if row["status"] == ImageStatus.OK and row["image_id"] and row["zarr_row"] is not None:
            valid = (row["clip_valid_h"], row["clip_valid_w"])
            embedded.setdefault(row["image_id"], (int(row["zarr_row"]), row["path"], valid))
    plan = QcPlan()
    for image_id, (zarr_row, _, valid) in embedded.items():
        plan.image_ids.append(image_id)
        plan.zarr_rows.append(zarr_row)
        plan.valid_hw.append(valid)
    done = set()
    if model_id is not None and qc_rows.num_rows:
        for row in qc_rows.select(["path", "image_id", "model_id"]).to_pylist():
            if row["model_id"] == model_id:
                done.add((row["path"], row["image_id"]))
    index = plan.index
    new_images = set()
    for path, row in latest.items():
        image_id = row["image_id"]
        if row["status"] not in USABLE_STATUSES or image_id not in embedded:
            continue
        original = embedded[image_id][1]
        file = QcFile(path, image_id, original if original != path else None)
        plan.files.append(file)
        if (path, image_id) not in done:
            plan.new_files.append(file)
            if file.exact_duplicate_of is None:
                new_images.add(index[image_id])
    plan.new_images = sorted(new_images)
    return plan
