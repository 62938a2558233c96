"""Manifest statuses, label kinds and sources are one typed definition each (issue 8).

Their members are the strings the files always held, so Parquet and JSON written with
members are byte-for-byte what plain strings wrote; every status a manifest row can get
is a member (rows are built from members and ``ImageError``, which refuses others).
"""
from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embed_args, run_cli

from batchseg.io.images import ImageError
from batchseg.io.statuses import (
    FAILURE_STATUSES, TRAIN_SOURCES, USABLE_STATUSES, ImageStatus, LabelKind, LabelSource, StudentKind, values,
)
from batchseg.io.tables import labels_table, manifest_table, read_manifest, write_part_atomic

ROOT = Path(__file__).resolve().parent.parent


def test_the_on_disk_strings_are_unchanged():
    assert values(ImageStatus) == ("ok", "duplicate", "empty", "truncated", "not_an_image", "too_large",
                                   "unreadable", "decode_error", "changed")
    assert USABLE_STATUSES == {"ok", "duplicate"} and FAILURE_STATUSES == set(ImageStatus) - {"ok", "duplicate"}
    assert values(LabelKind) == ("semantic", "instance")
    assert values(LabelSource) == ("maskclip", "sam", "student")
    assert values(StudentKind) == ("semantic", "instance", "sam-encoder")
    assert TRAIN_SOURCES == ("auto", "sam", "student", "maskclip")
    assert all(type(v) is str for v in (*values(ImageStatus), *TRAIN_SOURCES))  # plain strings, for click


def test_image_error_takes_failure_statuses_only():
    for status in FAILURE_STATUSES:
        error = ImageError(status.value, "why")
        assert error.status is status
        assert pickle.loads(pickle.dumps(error)).status is status  # Dask ships these between workers
    for bad in ("ok", "duplicate", "bogus", ""):
        with pytest.raises(ValueError, match="unknown image failure status"):
            ImageError(bad, "why")


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _manifest_rows(statuses) -> list[dict]:
    return [{"image_id": f"{i:064x}", "path": f"{i}.jpg", "bytes": 1, "mtime": 0.0, "status": status, "zarr_row": i,
             "shard": "s", "run_id": "r"} for i, status in enumerate(statuses)]


def test_parquet_columns_hold_plain_strings(tmp_path):
    members = list(ImageStatus)
    with_members = manifest_table(_manifest_rows(members))
    with_strings = manifest_table(_manifest_rows(values(ImageStatus)))
    assert with_members.schema.field("status").type == pa.string()
    assert _parquet_bytes(with_members) == _parquet_bytes(with_strings)  # byte-compatible files

    write_part_atomic(with_members, tmp_path / "manifest" / "part-0.parquet")
    back = read_manifest(tmp_path).column("status").to_pylist()
    assert back == list(values(ImageStatus))
    assert all(type(v) is str for v in back)
    assert [ImageStatus(v) for v in back] == members  # every value read back is a member

    label = {"image_id": "0" * 64, "segment_id": 0, "class_id": 0, "class_name": "a", "score": 1.0, "round": 0,
             "bbox": [0.0, 0.0, 1.0, 1.0], "area": 1, "mask": {"size": [1, 1], "counts": "1"}}
    rows = [{**label, "kind": kind, "source": source} for kind in LabelKind for source in LabelSource]
    plain = [{**row, "kind": row["kind"].value, "source": row["source"].value} for row in rows]
    assert _parquet_bytes(labels_table(rows)) == _parquet_bytes(labels_table(plain))


def test_a_real_embed_writes_members_as_plain_strings(tmp_path, image_folder, tiny_models, dask_scheduler):
    """What the embed stage writes for good, copied and broken files: members, read back as plain str."""
    from test_images import enc, half, noise

    first = sorted(image_folder.rglob("*.png"))[0]
    (image_folder / "copy.png").write_bytes(first.read_bytes())
    (image_folder / "empty.jpg").write_bytes(b"")
    (image_folder / "text.jpg").write_bytes(b"hello, not an image\n")
    (image_folder / "cut.jpg").write_bytes(half(enc(noise(), "JPEG", quality=90)))
    out = tmp_path / "out"
    result = run_cli(embed_args(image_folder, out, tiny_models, "--no-sam", "--scheduler", dask_scheduler))
    assert result.exit_code == 0, result.output
    table = read_manifest(out)
    assert table.schema.field("status").type == pa.string()
    statuses = table.column("status").to_pylist()
    assert set(statuses) == {"ok", "duplicate", "empty", "not_an_image", "truncated"}
    assert all(type(value) is str and value in tuple(ImageStatus) for value in statuses)


def test_label_parts_hold_members_as_plain_strings(labelled_build):
    """Every kind and source the pseudolabel stage wrote is a member, in a plain string column."""
    parts = sorted((labelled_build / "labels").rglob("part-*.parquet"))
    assert parts
    for part in parts:
        table = pq.read_table(part, columns=["kind", "source"])
        assert table.schema.field("kind").type == pa.string() and table.schema.field("source").type == pa.string()
        assert set(table.column("kind").to_pylist()) <= set(values(LabelKind))
        assert set(table.column("source").to_pylist()) <= set(values(LabelSource))


_WORDS = {*values(ImageStatus), *values(LabelKind), *values(LabelSource)}


def test_no_module_sets_a_status_kind_or_source_from_a_literal():
    """A row's status, kind or source is always a member: no ``"status": "ok"``, ``kind == "instance"``."""
    offenders = []
    for path in sorted((ROOT / "batchseg").rglob("*.py")):
        if path.name == "statuses.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            pairs = []
            if isinstance(node, ast.Dict):
                pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
            elif isinstance(node, ast.Call):
                pairs = [(k.arg, k.value) for k in node.keywords]
            elif isinstance(node, ast.Compare) and len(node.comparators) == 1:
                side = node.left  # kind == ..., config.kind == ..., row["kind"] == ...
                name = (side.id if isinstance(side, ast.Name) else side.attr if isinstance(side, ast.Attribute)
                        else side.slice.value if isinstance(side, ast.Subscript) and isinstance(side.slice, ast.Constant)
                        else None)
                pairs = [(name, node.comparators[0])]
            for key, value in pairs:
                if key in ("status", "kind", "source") and isinstance(value, ast.Constant) and value.value in _WORDS:
                    offenders.append(f"{path.relative_to(ROOT)}:{value.lineno}: {key} = {value.value!r}")
    assert offenders == []
