"""Damaged embeddings are found, never labelled from, and repaired by `embed --verify`."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from batchseg.io.store_integrity import arrays_without_checksums, chunk_file, verify_rows
from batchseg.io.tables import read_labels, read_manifest
from helpers import arrays_by_image, embed_args, run_cli

DETERMINISTIC = ["--batch-size", "1"]  # one image per forward: rows do not depend on batch-mates
FAST = ["--classes", "red thing,green thing,blue thing", "--points-per-side", "4", "--pred-iou-thresh", "0",
        "--stability-thresh", "0", "--rounds", "0", "-q"]


@pytest.fixture(scope="module")
def _clean_build(tmp_path_factory, _image_folder_template, tiny_models, dask_scheduler) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("integrity")
    src = root / "images"
    shutil.copytree(_image_folder_template, src)
    out = root / "clean"
    result = run_cli(embed_args(src, out, tiny_models, "--scheduler", dask_scheduler, *DETERMINISTIC))
    assert result.exit_code == 0, result.output
    return src, out


def _delete_chunk(out: Path, name: str, row: int) -> None:
    chunk_file(out, zarr.open_group(str(out / "embeddings.zarr"), mode="r")[name], row).unlink()


def _flip_byte(out: Path, name: str, row: int) -> None:
    path = chunk_file(out, zarr.open_group(str(out / "embeddings.zarr"), mode="r")[name], row)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the zstd frame, before the checksum
    path.write_bytes(bytes(data))


def _truncate(out: Path, name: str, row: int) -> None:
    path = chunk_file(out, zarr.open_group(str(out / "embeddings.zarr"), mode="r")[name], row)
    path.write_bytes(path.read_bytes()[:5])


DAMAGE = {"deleted chunk": _delete_chunk, "flipped byte": _flip_byte, "truncated chunk": _truncate}


@pytest.mark.parametrize("array", ["clip_tokens", "sam"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_rows_finds_each_kind_of_damage(_clean_build, tmp_path, damage, array):
    _, clean = _clean_build
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    assert arrays_without_checksums(out) == []
    assert verify_rows(out, range(8)) == {}
    DAMAGE[damage](out, array, 3)
    found = verify_rows(out, range(8))
    assert list(found) == [3] and found[3].startswith(array)


def _ids_by_row(out: Path) -> dict[int, str]:
    return {r["zarr_row"]: r["image_id"] for r in read_manifest(out).to_pylist() if r["status"] == "ok"}


@pytest.mark.parametrize("damage", ["deleted chunk", "flipped byte"])
def test_damaged_row_is_not_labelled_and_verify_repairs_it(_clean_build, tmp_path, tiny_models, dask_scheduler, damage):
    src, clean = _clean_build
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    DAMAGE[damage](out, "clip_tokens", 2)
    DAMAGE[damage](out, "sam", 5)
    victims = {_ids_by_row(out)[2], _ids_by_row(out)[5]}

    labelled = run_cli(["pseudolabel", str(out), "--scheduler", dask_scheduler, *FAST])
    assert labelled.exit_code == 1, labelled.output
    assert "2 images NOT labelled" in labelled.output and "embed SRC" in labelled.output
    assert "--verify" in labelled.output
    ids = set(read_labels(out, 0).column("image_id").to_pylist())
    assert len(ids) == 6 and not ids & victims  # never labelled from zeros or garbage

    plain = run_cli(embed_args(src, out, tiny_models, "--scheduler", dask_scheduler, *DETERMINISTIC))
    assert plain.exit_code == 0 and "0 computed" in plain.output  # a plain rerun reads nothing back
    verified = run_cli(embed_args(src, out, tiny_models, "--scheduler", dask_scheduler, "--verify", *DETERMINISTIC))
    assert verified.exit_code == 0, verified.output
    assert "verify: 8 stored rows read back, 2 damaged, 2 recomputed, 0 left damaged" in verified.output
    assert "2 computed" in verified.output
    assert verify_rows(out, range(8)) == {}
    repaired, reference = arrays_by_image(out), arrays_by_image(clean)
    assert repaired.keys() == reference.keys()
    for image_id, arrays in reference.items():
        for name, values in arrays.items():
            np.testing.assert_array_equal(repaired[image_id][name], values, err_msg=f"{name} {image_id}")

    again = run_cli(["pseudolabel", str(out), "--scheduler", dask_scheduler, *FAST])
    assert again.exit_code == 0, again.output
    assert "round 0: 2 images" in again.output
    assert len(set(read_labels(out, 0).column("image_id").to_pylist())) == 8


def test_verify_reports_a_damaged_row_whose_file_is_gone(_clean_build, tmp_path, tiny_models, dask_scheduler):
    src_template, clean = _clean_build
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(src_template, src)
    shutil.copytree(clean, out)
    row = next(r for r in read_manifest(out).to_pylist() if r["zarr_row"] == 4)
    (src / row["path"]).unlink()
    _delete_chunk(out, "clip_global", 4)
    result = run_cli(embed_args(src, out, tiny_models, "--scheduler", dask_scheduler, "--verify", *DETERMINISTIC))
    assert result.exit_code == 1
    assert "1 damaged, 0 recomputed, 1 left damaged" in result.output
    assert f"row 4 (image {row['image_id']})" in result.output and "Traceback" not in result.output


def test_qc_refuses_a_damaged_row_with_the_fix(_clean_build, tmp_path):
    _, clean = _clean_build
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    _flip_byte(out, "clip_global", 1)
    result = run_cli(["qc", str(out), "-q"])
    assert result.exit_code == 1, result.output
    assert "clip_global row 1" in result.output and "--verify" in result.output
    assert "Traceback" not in result.output
