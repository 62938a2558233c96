"""The qc table (``OUT/qc/part-*.parquet``) and the fitted qc model files beside it.

One row per source file that has embeddings (manifest status ``ok``, or ``duplicate``:
the same bytes under another path). A run writes one part with the rows it added;
``--refit`` writes a complete new set and then removes the older parts. Readers keep
the latest row per path (run ids sort by time), so a crash between those two steps
reads correctly too.

The fitted model is ``OUT/qc/_model.json`` (settings, thresholds, fit facts, the
name of its arrays file) and ``OUT/qc/_model-<MODEL_ID>.safetensors`` (float arrays):
names starting with ``_`` so the folder still reads as a Parquet dataset. The arrays
are written first, the JSON last by rename: the JSON is the commit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchseg.io.files import atomic_path, write_json_atomic
from batchseg.io.tables import _with_identity, read_parts, visible_parts, write_part_atomic

QC_FOLDER = "qc"
QC_VERSION = 1
MODEL_FILE = "_model.json"
REASON_OUTLIER = "outlier"
REASON_NEAR_DUPLICATE = "near_duplicate"
REASON_EXACT_DUPLICATE = "exact_duplicate"
REASONS = (REASON_OUTLIER, REASON_NEAR_DUPLICATE, REASON_EXACT_DUPLICATE)

QC_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # SHA-256 of the file's bytes (manifest)
        pa.field("path", pa.string(), nullable=False),  # relative to the source folder
        pa.field("score_rglasso", pa.float64()),  # null where the method was not run
        pa.field("score_mogaal", pa.float64()),
        pa.field("score_mcd", pa.float64()),
        pa.field("outlier", pa.bool_(), nullable=False),  # the flagging method's score above its threshold
        pa.field("near_duplicate_of", pa.string()),  # image id of the group's kept image
        pa.field("similarity", pa.float32()),  # highest cosine to another member of its group
        pa.field("exact_duplicate_of", pa.string()),  # path whose identical bytes were embedded
        pa.field("flagged", pa.bool_(), nullable=False),  # later stages leave this file out
        pa.field("reason", pa.string()),  # outlier | near_duplicate | exact_duplicate | null
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def qc_schema() -> pa.Schema:
    return _with_identity(QC_SCHEMA, "qc", QC_VERSION)


def qc_folder(out: Path) -> Path:
    return out / QC_FOLDER


def qc_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=qc_schema())


def qc_table_from_columns(columns: dict[str, Any]) -> pa.Table:
    """A qc table from whole columns (lists or numpy arrays, None/NaN-free where non-nullable)."""
    schema = qc_schema()
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)


def write_qc_part(out: Path, run_id: str, table: pa.Table) -> Path:
    return write_part_atomic(table.cast(qc_schema()), qc_folder(out) / f"part-{run_id}.parquet")


def read_qc(out: Path) -> pa.Table:
    """The current qc rows of ``out``: the latest row per path; empty when there is no table."""
    table = read_parts(qc_folder(out), "qc", QC_VERSION, qc_schema())
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("path", "ascending"), ("run_id", "descending")])
    table = table.take(order)
    paths = table.column("path").to_pylist()
    keep = [index for index, path in enumerate(paths) if index == 0 or path != paths[index - 1]]
    return table.take(pa.array(keep, type=pa.int64()))


def remove_parts_except(out: Path, run_id: str) -> int:
    """Delete every committed part but this run's (after ``--refit``); return how many."""
    keep = f"part-{run_id}.parquet"
    removed = 0
    for part in visible_parts(qc_folder(out)):
        if part.name != keep:
            part.unlink(missing_ok=True)
            removed += 1
    return removed


def write_model_files(out: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write the model's arrays, then its JSON (the commit); remove older arrays files."""
    from safetensors.numpy import save_file

    folder = qc_folder(out)
    arrays_name = f"_model-{meta['model_id']}.safetensors"
    with atomic_path(folder / arrays_name) as tmp:
        save_file(arrays, str(tmp))
    write_json_atomic(folder / MODEL_FILE, {**meta, "arrays": arrays_name}, default=float)
    for old in folder.glob("_model-*.safetensors"):
        if old.name != arrays_name:
            old.unlink(missing_ok=True)
    return folder / MODEL_FILE


def read_model_files(out: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The stored model's (meta, arrays), or None when no model was fitted yet."""
    from safetensors.numpy import load_file

    path = qc_folder(out) / MODEL_FILE
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    return meta, load_file(str(qc_folder(out) / meta["arrays"]))
