import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.errors import SchemaVersionError
from batchseg.io.files import remove_temporaries
from batchseg.io.tables import (
    manifest_table,
    read_manifest,
    visible_parts,
    write_part_atomic,
)


def _row(path: str, status: str = "ok") -> dict:
    return {"image_id": "ab" * 32, "path": path, "bytes": 10, "mtime": 1.5, "status": status, "zarr_row": 0,
            "shard": "s", "run_id": "r"}


def test_part_round_trip_keeps_schema_version(tmp_path):
    part = write_part_atomic(manifest_table([_row("a.jpg"), _row("b.jpg", "truncated")]), tmp_path / "manifest" / "part-1.parquet")
    meta = pq.read_schema(part).metadata
    assert meta[b"batchseg.schema"] == b"manifest" and meta[b"batchseg.schema_version"] == b"1"
    table = read_manifest(tmp_path)
    assert table.column("path").to_pylist() == ["a.jpg", "b.jpg"]
    assert table.column("status").to_pylist() == ["ok", "truncated"]
    assert table.column("width").to_pylist() == [None, None]


def test_readers_ignore_hidden_and_private_names(tmp_path):
    folder = tmp_path / "manifest"
    write_part_atomic(manifest_table([_row("a.jpg")]), folder / "part-1.parquet")
    pq.write_table(manifest_table([_row("x.jpg")]), folder / ".part-2.parquet.abc.tmp")
    pq.write_table(manifest_table([_row("y.jpg")]), folder / "_part-3.parquet")
    assert [p.name for p in visible_parts(folder)] == ["part-1.parquet"]
    assert read_manifest(tmp_path).num_rows == 1
    assert remove_temporaries(folder) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["_part-3.parquet", "part-1.parquet"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    folder = tmp_path / "manifest"
    folder.mkdir()
    with pytest.raises(Exception):
        write_part_atomic(object(), folder / "part-1.parquet")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "metadata, fragment",
    [({b"batchseg.schema": b"manifest", b"batchseg.schema_version": b"99"}, "version 99"),
     ({b"batchseg.schema": b"labels", b"batchseg.schema_version": b"1"}, "'labels'")],
)
def test_unknown_schema_version_is_refused_with_advice(tmp_path, metadata, fragment):
    folder = tmp_path / "manifest"
    folder.mkdir()
    table = manifest_table([_row("a.jpg")])
    pq.write_table(table.replace_schema_metadata(metadata), folder / "part-1.parquet")
    with pytest.raises(SchemaVersionError) as info:
        read_manifest(tmp_path)
    assert fragment in str(info.value) and "--overwrite" in str(info.value)


def test_a_part_without_batchseg_metadata_is_a_stray_file_with_the_repair(tmp_path):
    from batchseg.io.tables import DamagedPartError

    folder = tmp_path / "manifest"
    folder.mkdir()
    pq.write_table(manifest_table([_row("a.jpg")]).replace_schema_metadata({}), folder / "part-1.parquet")
    with pytest.raises(DamagedPartError) as info:
        read_manifest(tmp_path)
    assert "a stray file" in str(info.value) and "--repair" in str(info.value)
