"""Parquet tables between stages: schemas declared once, versioned, written atomically.

A part file is the commit marker of its shard (DESIGN rule 2): it is written under a
temporary name starting with ``.`` and renamed into place, so a reader never sees a
half-written part, and readers ignore names starting with ``.`` or ``_``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.errors import SchemaVersionError, UsageError
from batchseg.io.files import atomic_path

SCHEMA_NAME_KEY = b"batchseg.schema"
SCHEMA_VERSION_KEY = b"batchseg.schema_version"

MANIFEST_VERSION = 1
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),  # SHA-256 of the file's bytes; null if unreadable
        pa.field("path", pa.string()),  # relative to the source folder, POSIX separators
        pa.field("bytes", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("width", pa.int32()),  # original size after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("clip_valid_h", pa.int32()),  # valid region on the CLIP canvas (rows, cols)
        pa.field("clip_valid_w", pa.int32()),
        pa.field("sam_valid_h", pa.int32()),  # valid region on the SAM canvas
        pa.field("sam_valid_w", pa.int32()),
        pa.field("frames", pa.int32()),
        pa.field("status", pa.string()),  # "ok", "duplicate" or a failure kind
        pa.field("error", pa.string()),
        pa.field("zarr_row", pa.int64()),  # row in embeddings.zarr; null when nothing is stored
        pa.field("shard", pa.string()),
        pa.field("run_id", pa.string()),
    ]
)


def _with_identity(schema: pa.Schema, name: str, version: int) -> pa.Schema:
    return schema.with_metadata({SCHEMA_NAME_KEY: name.encode(), SCHEMA_VERSION_KEY: str(version).encode()})


def manifest_schema() -> pa.Schema:
    return _with_identity(MANIFEST_SCHEMA, "manifest", MANIFEST_VERSION)


def write_part_atomic(table: pa.Table, final_path: Path) -> Path:
    """Write ``table`` to ``final_path`` via a hidden temporary file and a rename.

    The rename is atomic on POSIX filesystems, so the part either exists whole or not
    at all. fsync before the rename so a power loss cannot leave a committed empty file.
    """
    with atomic_path(final_path, fsync=True) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
    return final_path


def visible_parts(folder: Path) -> list[Path]:
    """Committed part files in ``folder``, sorted; temporary and private names ignored."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_"))
    )


QUARANTINE = "quarantine"
# What each folder's damaged part needs; {path} and {out} are filled in.
_PART_FIXES = {
    "manifest": "run `batchseg embed SRC {out} --repair`: it moves the part to {out}/quarantine/ and re-plans "
                "the files it covered, keeping their stored embeddings",
    "labels": "move it to {out}/quarantine/ (mkdir -p {out}/quarantine && mv '{path}' {out}/quarantine/) and "
              "run `batchseg pseudolabel` again: it labels the images that part held",
    "qc": "move it to {out}/quarantine/ and run `batchseg qc {out} --refit`",
}


class DamagedPartError(UsageError):
    """A Parquet file in a table folder is truncated, unreadable or not a batchseg part."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        return (type(self), (str(self), self.path))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def _table_kind(path: Path) -> tuple[str, Path]:
    """Which table folder ``path`` lies in (manifest, labels, qc, ...) and the build folder."""
    parent = path.parent
    if parent.name.startswith("round=") and parent.parent.name == "labels":
        return "labels", parent.parent.parent
    return parent.name, parent.parent


def damaged_part_error(path: Path, why: str) -> DamagedPartError:
    """The one message for a damaged part: the file, what is wrong, and the fix."""
    kind, out = _table_kind(path)
    fix = _PART_FIXES.get(kind, "move it out of {folder} (to {out}/quarantine/) and rerun the command that wrote it")
    fix = fix.format(out=out, path=path, folder=path.parent)
    return DamagedPartError(f"{path} {why}; {fix}", path)


def read_schema_checked(path: Path, identity: bool = True) -> pa.Schema:
    """A part's schema; ``DamagedPartError`` when it is not a readable (batchseg, with ``identity``) Parquet part."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise damaged_part_error(path, f"is not a readable Parquet file (truncated or damaged: {_one_line(exc)})") from None
    if identity and SCHEMA_NAME_KEY not in (schema.metadata or {}):
        raise damaged_part_error(path, "is not a batchseg part (its metadata names no batchseg schema: a stray file)")
    return schema


def read_part(path: Path, columns: list[str] | None = None, filters=None, identity: bool = True) -> pa.Table:
    """One part, read whole: ``DamagedPartError`` naming the file when any page of it is damaged.

    ``identity`` False reads any Parquet table (a report shows what is there); by default a
    file without batchseg's schema metadata is a stray file and refused as well.
    """
    read_schema_checked(path, identity)
    try:
        if filters is None:  # one file, no dataset: pq.read_table would import pyarrow.dataset (and pandas), ~0.5 s
            with pq.ParquetFile(path, page_checksum_verification=True) as parquet:
                return parquet.read(columns=columns)
        return pq.read_table(path, columns=columns, filters=filters, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise damaged_part_error(path, f"cannot be read (damaged: {_one_line(exc)})") from None


def damaged_parts(folder: Path) -> list[tuple[Path, str]]:
    """The visible parts of ``folder`` that do not read whole, with why (every page is read)."""
    found = []
    for part in visible_parts(folder):
        try:
            read_part(part)
        except DamagedPartError as exc:
            found.append((part, str(exc)))
    return found


def quarantine_damaged_parts(out: Path, folder: Path) -> list[Path]:
    """Move ``folder``'s damaged and stray parts to ``OUT/quarantine/FOLDER/``; return where they went."""
    moved = []
    for part, _ in damaged_parts(folder):
        target = out / QUARANTINE / folder.relative_to(out) / part.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(part), target)
        moved.append(target)
    return moved


def check_version(schema: pa.Schema, name: str, known: int, path: Path) -> None:
    """Refuse a file written by an unknown schema version, saying what to do."""
    meta = schema.metadata or {}
    found_name = meta.get(SCHEMA_NAME_KEY, b"").decode()
    found = meta.get(SCHEMA_VERSION_KEY, b"").decode()
    if found_name != name or found != str(known):
        raise SchemaVersionError(
            f"{path} is a '{found_name or 'unknown'}' table of schema version {found or 'unknown'}, "
            f"but this batchseg reads '{name}' version {known}; rebuild the folder with "
            "--overwrite using this version, or use the batchseg version that wrote it"
        )


def read_parts(folder: Path, name: str, version: int, schema: pa.Schema) -> pa.Table:
    """Read all committed parts of a table, checking each part's schema version."""
    parts = visible_parts(folder)
    tables = []
    for part in parts:
        table = read_part(part)
        check_version(table.schema, name, version, part)
        try:
            tables.append(table.cast(schema))
        except (pa.ArrowException, ValueError) as exc:
            raise damaged_part_error(part, f"does not hold the '{name}' columns ({_one_line(exc)})") from None
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def manifest_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=manifest_schema())


def read_manifest(out: Path) -> pa.Table:
    """All committed manifest rows of the build in ``out`` (one row per source file per run)."""
    return read_parts(out / "manifest", "manifest", MANIFEST_VERSION, manifest_schema())


# 2: the round lives only in the hive folder name (labels/round=K/), not also as a column:
# pyarrow and pandas refused the two as conflicting types when reading OUT/labels.
LABELS_VERSION = 2
_LABEL_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # "semantic" or "instance"
    pa.field("segment_id", pa.int32(), nullable=False),  # unique within (image, round, source, kind)
    pa.field("class_id", pa.int32(), nullable=False),
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),  # mean class probability in the segment, [0, 1]
    pa.field("source", pa.string(), nullable=False),  # "maskclip", "sam" or "student"
    pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),  # x, y, w, h in original pixels
    pa.field("area", pa.int64(), nullable=False),  # pixels, original size
    pa.field(
        "mask",  # COCO RLE in original pixels: {"size": [h, w], "counts": str}
        pa.struct([pa.field("size", pa.list_(pa.int32(), 2)), pa.field("counts", pa.string())]),
        nullable=False,
    ),
]
LABELS_FILE_SCHEMA = pa.schema(_LABEL_FIELDS)  # what a part holds
# What read_labels returns: the file columns plus ``round`` from the folder name.
LABELS_SCHEMA = pa.schema(_LABEL_FIELDS[:7] + [pa.field("round", pa.int32(), nullable=False)] + _LABEL_FIELDS[7:])


def labels_schema() -> pa.Schema:
    """The schema of a label part on disk (no ``round``: the folder ``round=K`` carries it)."""
    return _with_identity(LABELS_FILE_SCHEMA, "labels", LABELS_VERSION)


def labels_table(rows: list[dict]) -> pa.Table:
    """A label part from row dicts (a ``round`` key, if present, is left to the folder name)."""
    return pa.Table.from_pylist(rows, schema=labels_schema())


def round_folder(out: Path, round_index: int) -> Path:
    """Round K's label parts (Parquet only: the folder reads as a hive-partitioned dataset)."""
    return out / "labels" / f"round={round_index}"


def selftrain_folder(out: Path, round_index: int) -> Path:
    """Round K's other artefacts: ``_round.json``, the training-target grid, the head weights."""
    return out / "selftrain" / f"round={round_index}"


def numbered_rounds(parent: Path) -> list[tuple[int, Path]]:
    """The ``round=K`` folders directly in ``parent`` (``OUT/labels`` or ``OUT/selftrain``)
    with their K, ascending; other names are not rounds and are left out."""
    if not parent.is_dir():
        return []
    found = []
    for folder in parent.glob("round=*"):
        suffix = folder.name.split("=", 1)[1]
        if suffix.isdigit() and folder.is_dir():
            found.append((int(suffix), folder))
    return sorted(found)


def set_aside_folder(out: Path, round_index: int) -> Path:
    """Where a discarded round's label parts are kept: out of ``labels/`` (so no reader
    takes them as a round) but not deleted (a user can still look at them)."""
    return selftrain_folder(out, round_index) / "set-aside-labels"


def set_aside_round(out: Path, round_index: int) -> Path:
    """Move round K's label parts to :func:`set_aside_folder` (one rename); a no-op once done."""
    source, target = round_folder(out, round_index), set_aside_folder(out, round_index)
    if source.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        source.replace(target)
    return target


def read_labels(out: Path, round_index: int) -> pa.Table:
    """All committed label rows of one round, with its ``round`` column (:data:`LABELS_SCHEMA`)."""
    table = read_parts(round_folder(out, round_index), "labels", LABELS_VERSION, labels_schema())
    return with_round(table, round_index)


def with_round(table: pa.Table, round_index: int) -> pa.Table:
    """A label-part table with the ``round`` column its folder name implies."""
    column = pa.array([round_index] * table.num_rows, type=pa.int32())
    table = table.add_column(LABELS_SCHEMA.get_field_index("round"), LABELS_SCHEMA.field("round"), column)
    return table.replace_schema_metadata(None)


EVAL_FOLDER = "eval"
EVAL_VERSION = 1
# `batchseg evaluate`'s results, OUT/eval/EVAL_ID.parquet: one row per round, source and class.
EVAL_SCHEMA = pa.schema(
    [
        pa.field("eval_id", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("images", pa.int32()),  # images scored for this round and source
        pa.field("class_id", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("iou", pa.float64()),  # null: class absent from the ground truth
        pa.field("intersection", pa.int64()),
        pa.field("union", pa.int64()),
        pa.field("gt_pixels", pa.int64()),
        pa.field("pred_pixels", pa.int64()),
        pa.field("miou", pa.float64()),  # of the round and source (repeated on its rows); null if undefined
        pa.field("pixel_accuracy", pa.float64()),
        pa.field("unlabelled_pixels", pa.int64()),  # scored pixels that no label row covers
        pa.field("total_pixels", pa.int64()),  # scored ground-truth pixels
    ]
).with_metadata({SCHEMA_NAME_KEY: b"eval", SCHEMA_VERSION_KEY: str(EVAL_VERSION).encode()})
