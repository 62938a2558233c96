"""Damaged, stray and newer-schema Parquet parts: named with the fix (exit 2), never a traceback;
`embed --repair` quarantines a damaged manifest part and keeps the intact embeddings."""
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.io.tables import SCHEMA_NAME_KEY, SCHEMA_VERSION_KEY, labels_schema, read_labels, read_manifest, visible_parts
from batchseg.testing_labels import write_labelled_build
from helpers import arrays_by_image, embed_args, manifest_rows, run_cli


def _truncate(folder: Path) -> Path:
    part = visible_parts(folder)[0]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    return part


def _garbage(folder: Path) -> Path:
    part = folder / "part-garbage.parquet"
    part.write_bytes(b"PAR1 this is not parquet at all\n")
    return part


def _foreign(folder: Path) -> Path:
    part = folder / "part-foreign.parquet"
    pq.write_table(pa.table({"image_id": ["x"], "value": [1.0]}), part)  # valid Parquet, not ours
    return part


def _flipped(folder: Path) -> Path:
    part = visible_parts(folder)[0]
    data = bytearray(part.read_bytes())
    data[8] ^= 0xFF  # inside the first data page
    part.write_bytes(bytes(data))
    return part


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "foreign": _foreign, "flipped": _flipped}


@pytest.fixture(scope="module")
def _labelled(tmp_path_factory):
    return write_labelled_build(tmp_path_factory.mktemp("labelled"), 6, seed=2, rounds=0, shard_size=3)


@pytest.fixture
def labelled(tmp_path, _labelled):
    out = tmp_path / "out"
    shutil.copytree(_labelled.out, out)
    return out, _labelled.images


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("folder, command, fix", [
    ("manifest", ["export", "{out}", "{tmp}/coco", "--format", "coco", "--images", "none"], "embed SRC {out} --repair"),
    ("manifest", ["report", "{out}"], "embed SRC {out} --repair"),
    ("labels/round=0", ["export", "{out}", "{tmp}/png", "--format", "png", "--images", "none"], "pseudolabel"),
    ("labels/round=0", ["report", "{out}"], "pseudolabel"),
])
def test_damaged_part_is_named_with_the_fix(labelled, tmp_path, damage, folder, command, fix):
    out, _ = labelled
    part = DAMAGE[damage](out / folder)
    result = run_cli([arg.format(out=out, tmp=tmp_path) for arg in command] + ["-q"] * (command[0] == "export"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(part) in error[0] and fix.format(out=out) in error[0], result.output


def test_a_newer_schema_label_part_is_refused(labelled, tmp_path):
    out, _ = labelled
    newer = labels_schema().with_metadata({SCHEMA_NAME_KEY: b"labels", SCHEMA_VERSION_KEY: b"99"})
    pq.write_table(newer.empty_table(), out / "labels" / "round=0" / "part-newer.parquet")
    result = run_cli(["export", str(out), str(tmp_path / "coco"), "--format", "coco", "--images", "none", "-q"])
    assert result.exit_code == 2 and "schema version 99" in result.output, result.output


# ------------------------------------------------------------------ embed --repair, pseudolabel


@pytest.fixture(scope="module")
def _embedded(tmp_path_factory, _image_folder_template, tiny_models, dask_scheduler) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parts")
    src = root / "images"
    shutil.copytree(_image_folder_template, src)
    out = root / "clean"
    result = run_cli(embed_args(src, out, tiny_models, "--scheduler", dask_scheduler, "--no-sam", "--batch-size", "1"))
    assert result.exit_code == 0, result.output
    return src, out


def _current(out: Path) -> list[dict]:
    """The latest manifest row per path, without the fields that differ between equal runs."""
    latest = {}
    for row in sorted(read_manifest(out).to_pylist(), key=lambda r: r["run_id"]):
        latest[row["path"]] = row
    volatile = ("mtime", "shard", "run_id", "zarr_row")
    return sorted(({k: v for k, v in r.items() if k not in volatile} for r in latest.values()), key=lambda r: r["path"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped"])
def test_embed_repair_quarantines_the_part_and_keeps_the_embeddings(_embedded, tmp_path, tiny_models, dask_scheduler,
                                                                    damage):
    src, clean = _embedded
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    part = DAMAGE[damage](out / "manifest")
    args = embed_args(src, out, tiny_models, "--scheduler", dask_scheduler, "--no-sam", "--batch-size", "1")

    for command in (args, ["pseudolabel", str(out), "--classes", "a,b", "--no-sam", "-q"]):
        refused = run_cli(command)
        assert refused.exit_code == 2, refused.output
        assert str(part) in refused.output and "--repair" in refused.output and "Traceback" not in refused.output

    repaired = run_cli(args + ["--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert (out / "quarantine" / "manifest" / part.name).is_file() and not part.exists()
    assert "0 computed" in repaired.output  # the images it covered kept their intact rows
    assert _current(out) == _current(clean)
    assert manifest_rows(out) == manifest_rows(clean) or damage == "garbage"
    repaired_arrays, reference = arrays_by_image(out), arrays_by_image(clean)
    assert repaired_arrays.keys() == reference.keys()
    for image_id, arrays in reference.items():
        for name, values in arrays.items():
            np.testing.assert_array_equal(repaired_arrays[image_id][name], values)
    again = run_cli(args)
    assert again.exit_code == 0 and "0 computed" in again.output and "8 skipped" in again.output


def test_a_round_with_a_newer_schema_part_is_not_complete(_embedded, tmp_path, dask_scheduler):
    _, clean = _embedded
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    args = ["pseudolabel", str(out), "--classes", "red thing,blue thing", "--no-sam", "--rounds", "0",
            "--scheduler", dask_scheduler, "-q"]
    assert run_cli(args).exit_code == 0
    part = visible_parts(out / "labels" / "round=0")[0]
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({SCHEMA_NAME_KEY: b"labels", SCHEMA_VERSION_KEY: b"3"}), part)
    result = run_cli(args)
    assert result.exit_code == 2 and "schema version 3" in result.output and str(part) in result.output, result.output


def test_a_damaged_label_part_moved_aside_is_labelled_again(_embedded, tmp_path, dask_scheduler):
    _, clean = _embedded
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    args = ["pseudolabel", str(out), "--classes", "red thing,blue thing", "--no-sam", "--rounds", "1", "--epochs", "1",
            "--stop-agreement", "1", "--shard-size", "3", "--scheduler", dask_scheduler, "-q"]
    first = run_cli(args)
    assert first.exit_code == 0, first.output
    before = {k: read_labels(out, k).sort_by([("image_id", "ascending"), ("segment_id", "ascending")]) for k in (0, 1)}
    part = _truncate(out / "labels" / "round=1")
    refused = run_cli(args)
    assert refused.exit_code == 2 and str(part) in refused.output and "quarantine" in refused.output, refused.output
    (out / "quarantine").mkdir()
    shutil.move(str(part), out / "quarantine" / part.name)  # what the message says to do
    again = run_cli(args)
    assert again.exit_code == 0, again.output
    assert "round 0: already complete" in again.output and "round 1: 3 images" in again.output
    for k in (0, 1):
        after = read_labels(out, k).sort_by([("image_id", "ascending"), ("segment_id", "ascending")])
        assert after.drop_columns(["mask"]).equals(before[k].drop_columns(["mask"]))
