"""`batchseg predict STUDENT SRC DEST`: a folder labelled by a student, read back by `evaluate`."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from batchseg.io.tables import LABELS_SCHEMA, labels_table, read_labels, read_manifest, round_folder, write_part_atomic
from batchseg.labels.rle import decode_mask
from batchseg.world import write_world
from helpers import run_cli

@pytest.fixture
def student(trained_student) -> Path:
    return trained_student


@pytest.fixture
def world(tmp_path) -> Path:
    """4 unseen world images with ground truth, plus a broken file and a duplicate."""
    write_world(tmp_path / "world", 4, seed=12, max_side=72)
    images = tmp_path / "world" / "images"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(images / "s12_000001.png", images / "copy.png")
    return tmp_path / "world"


def _predict(student: Path, src: Path, dest: Path, scheduler: str, *extra: str):
    return run_cli(["predict", str(student), str(src), str(dest), "--scheduler", scheduler, "--shard-size", "2",
                    "--batch-size", "3", "--threads", "1", "-q", *extra])


def test_predict_writes_the_pseudolabel_schema_and_evaluate_reads_it(student, world, tmp_path, dask_scheduler):
    dest = tmp_path / "labelled"
    result = _predict(student, world / "images", dest, dask_scheduler)
    assert result.exit_code == 0, result.output
    assert "4 labelled, 1 failed, 0 skipped (unchanged), 1 duplicates" in result.output
    statuses = sorted(r["status"] for r in read_manifest(dest).to_pylist())
    assert statuses == ["duplicate", "ok", "ok", "ok", "ok", "truncated"]
    table = read_labels(dest, 0)
    assert table.schema.equals(LABELS_SCHEMA, check_metadata=False)
    assert set(table.column("source").to_pylist()) == {"student"}
    assert set(table.column("kind").to_pylist()) == {"semantic"}
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in read_manifest(dest).to_pylist() if r["status"] == "ok"}
    cover = {image_id: np.zeros(size, dtype=np.int32) for image_id, size in sizes.items()}
    for row in table.to_pylist():
        mask = decode_mask(row["mask"])
        cover[row["image_id"]] += mask  # original pixels; shape checked by the addition
        assert row["area"] == int(mask.sum()) and 0.0 <= row["score"] <= 1.0 + 1e-6
    # "background" is a class of the vocabulary: every pixel gets exactly one class.
    assert all((c == 1).all() for c in cover.values())

    evaluated = run_cli(["evaluate", str(dest), "--gt", str(world / "gt")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "4 images matched" in evaluated.output and "student" in evaluated.output


def test_predict_is_incremental_and_cleans_up_a_crashed_shard(student, world, tmp_path, dask_scheduler):
    dest = tmp_path / "labelled"
    assert _predict(student, world / "images", dest, dask_scheduler).exit_code == 0
    rows_before = read_labels(dest, 0).num_rows
    again = _predict(student, world / "images", dest, dask_scheduler)
    assert again.exit_code == 0 and "0 labelled, 0 failed, 6 skipped" in again.output
    # A shard that wrote its labels but died before committing its manifest part.
    orphan = round_folder(dest, 0) / "part-20990101T000000Z-dead00-00000.parquet"
    write_part_atomic(labels_table(read_labels(dest, 0).slice(0, 1).to_pylist()), orphan)
    write_world(world, 1, seed=12, start=4, max_side=72)
    grown = _predict(student, world / "images", dest, dask_scheduler)
    assert grown.exit_code == 0 and "1 labelled, 0 failed, 6 skipped" in grown.output
    assert not orphan.exists()
    table = read_labels(dest, 0)
    assert table.num_rows > rows_before
    assert len(set(table.column("image_id").to_pylist())) == 5


@pytest.mark.parametrize(
    "make_student, fragment",
    [
        (lambda s, tmp: tmp / "nothing", "does not exist"),
        (lambda s, tmp: s.parent, "holds no finished student"),
    ],
)
def test_bad_student_exits_2(student, world, tmp_path, dask_scheduler, make_student, fragment):
    result = _predict(make_student(student, tmp_path), world / "images", tmp_path / "dest", dask_scheduler)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_dest_of_another_student_is_refused(student, world, tmp_path, dask_scheduler):
    other = tmp_path / "other"
    shutil.copytree(student, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["background"] = weights["background"] + 1.0  # other weights: another student
    save_file(weights, str(other / "model.safetensors"))
    dest = tmp_path / "labelled"
    assert _predict(student, world / "images", dest, dask_scheduler).exit_code == 0
    refused = _predict(other, world / "images", dest, dask_scheduler)
    assert refused.exit_code == 2 and "another student" in refused.output
