"""`batchseg qc` end to end through the CLI on a small embedded build (tiny CLIP, no SAM)."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import zarr
from PIL import Image

from batchseg.io.lock import build_lock
from batchseg.io.qc_table import qc_schema
from batchseg.io.tables import read_manifest
from batchseg.qc.duplicates import brute_force_pairs, group_pairs
from batchseg.qc.flags import flagged_image_ids
from batchseg.testing import write_image_folder
from helpers import embed_args, run_cli

DUP = "0.999"  # the tiny random CLIP maps many images close together; a planted copy is closer still


def _embed(src: Path, out: Path, models, scheduler: str):
    result = run_cli(embed_args(src, out, models, "--scheduler", scheduler, "--no-sam"))
    assert result.exit_code == 0, result.output


def _plant_copies(src: Path) -> None:
    """An exact copy (same bytes) and a near copy (one pixel changed) of a/img0000.png."""
    original = src / "a" / "img0000.png"
    (src / "c").mkdir()
    shutil.copy(original, src / "c" / "copy.png")
    pixels = np.array(Image.open(original))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(src / "c" / "near.png")


@pytest.fixture(scope="module")
def _template(tmp_path_factory, tiny_models, dask_scheduler) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qc-build")
    src = root / "images"
    write_image_folder(src, 8, seed=3)
    _plant_copies(src)
    _embed(src, root / "out", tiny_models, dask_scheduler)
    return src, root / "out"


@pytest.fixture
def build(tmp_path, _template) -> tuple[Path, Path]:
    src, out = _template
    shutil.copytree(src, tmp_path / "images")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "images", tmp_path / "out"


def qc(out: Path, *args: str):
    return run_cli(["qc", str(out), "-q", *args])


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "qc").set_index("path").sort_index()


def _stored_unit_embeddings(out: Path) -> tuple[list[str], np.ndarray]:
    rows = [r for r in read_manifest(out).to_pylist() if r["status"] == "ok"]
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    values = np.stack([np.asarray(group["clip_global"][r["zarr_row"]], dtype=np.float32) for r in rows])
    return [r["image_id"] for r in rows], values


def test_rows_flags_reasons_and_readers(build):
    _, out = build
    assert flagged_image_ids(out) == frozenset()  # no qc table yet
    result = qc(out, "--dup-threshold", DUP, "--compare", "mcd", "--contamination", "0.2")
    assert result.exit_code == 0, result.output
    assert "qc finished (fitted a new model" in result.output and "10 of 10 files scored" in result.output

    # Readers: pyarrow dataset and pandas see one table with the declared schema.
    dataset = ds.dataset(out / "qc", format="parquet")
    assert dataset.schema.remove_metadata().equals(qc_schema().remove_metadata())
    assert [p.name.startswith("part-") for p in (out / "qc").iterdir() if not p.name.startswith("_")] == [True]
    table = _table(out)
    manifest = {r["path"]: r for r in read_manifest(out).to_pylist()}
    assert sorted(table.index) == sorted(manifest)  # one row per file
    assert table["image_id"].to_dict() == {path: row["image_id"] for path, row in manifest.items()}

    exact = table.loc["c/copy.png"]
    assert exact["reason"] == "exact_duplicate" and exact["flagged"] and exact["exact_duplicate_of"] == "a/img0000.png"
    near = table.loc["c/near.png"]
    assert near["reason"] == "near_duplicate" and near["flagged"]
    assert near["near_duplicate_of"] == manifest["a/img0000.png"]["image_id"] and near["similarity"] >= 0.999

    # Near-duplicates are exactly the brute-force pairs of the stored embeddings, grouped.
    ids, values = _stored_unit_embeddings(out)
    pairs = sorted(brute_force_pairs(values, 0.999))
    i, j = (np.array([p[k] for p in pairs], dtype=np.int64) for k in (0, 1))
    groups = group_pairs(len(ids), i, j, np.ones(len(pairs), dtype=np.float32))
    expected = {ids[k]: ids[rep] for k, rep in enumerate(groups.representative) if rep != k}
    scored = table[table["exact_duplicate_of"].isna()]
    got = {row.image_id: row.near_duplicate_of for row in scored.itertuples() if pd.notna(row.near_duplicate_of)}
    assert got == expected

    # Outliers: the flagging method's score above the stored threshold; 20% of the fit sample.
    model = json.loads((out / "qc" / "_model.json").read_text())
    threshold = model["thresholds"]["rglasso"]
    assert (scored["outlier"] == (scored["score_rglasso"] > threshold)).all()
    assert 1 <= scored["outlier"].sum() <= 2
    assert scored["score_mcd"].notna().all() and table["score_mogaal"].isna().all()
    assert model["info"]["rglasso"]["iterations"] >= 1 and "criterion" in model["info"]["rglasso"]
    reasons = scored.apply(lambda r: "outlier" if r["outlier"] else ("near_duplicate" if pd.notna(r["near_duplicate_of"]) else None), axis=1)
    assert (scored["reason"].fillna("-") == reasons.fillna("-")).all()
    assert (table["flagged"] == table["reason"].notna()).all()

    # What later stages call: flagged ids, never the id of an exact copy's original for being a copy.
    flagged = set(table.loc[table["flagged"] & (table["reason"] != "exact_duplicate"), "image_id"])
    assert flagged_image_ids(out) == frozenset(flagged) and manifest["c/near.png"]["image_id"] in flagged

    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json") if '"qc"' in p.read_text()]
    assert record["status"] == "finished" and record["counts"]["new_files"] == 10
    assert record["model"]["reduced_dim"] >= 2
    assert not list((out / "qc").glob("_work-*")) and not list((out / "qc").glob(".*tmp"))


def test_incremental_rerun_scores_only_new_files_and_refit_rescores(build, tiny_models, dask_scheduler):
    src, out = build
    assert qc(out, "--dup-threshold", DUP).exit_code == 0
    first = _table(out)
    model_id = json.loads((out / "qc" / "_model.json").read_text())["model_id"]

    again = qc(out)
    assert again.exit_code == 0 and "0 of 10 files scored" in again.output

    write_image_folder(src, 2, seed=3, start=20)
    _embed(src, out, tiny_models, dask_scheduler)
    result = qc(out)
    assert result.exit_code == 0, result.output
    assert "scored with the stored model" in result.output and "2 of 12 files scored" in result.output
    (new_part,) = re.findall(r"part-[^ ]+\.parquet", result.output)
    assert len(list((out / "qc").glob("part-*.parquet"))) == 2 and len(pd.read_parquet(out / "qc" / new_part)) == 2
    table = _table(out)
    assert len(table) == 12 and set(table["model_id"]) == {model_id}
    pd.testing.assert_frame_equal(table.loc[first.index], first)  # old rows untouched

    changed = qc(out, "--method", "mcd")
    assert changed.exit_code == 2 and "--refit" in changed.output and "method: 'rglasso' -> 'mcd'" in changed.output
    refit = qc(out, "--method", "mcd", "--features", "dense-mean", "--dup-features", "dense-grid", "--refit")
    assert refit.exit_code == 0 and "fitted a new model" in refit.output and "12 of 12" in refit.output
    assert len(list((out / "qc").glob("part-*.parquet"))) == 1
    table = _table(out)
    assert table["score_mcd"].notna().sum() == 11 and table["score_rglasso"].isna().all()
    # The stored settings carry over: the near-duplicate threshold given at the first fit stays.
    settings = json.loads((out / "qc" / "_model.json").read_text())["settings"]
    assert settings["dup_threshold"] == float(DUP) and settings["features"] == "dense-mean"
    assert table.loc["c/near.png", "reason"] == "near_duplicate"  # a one-pixel change keeps the layout too


def test_lock_held_exits_75(build):
    _, out = build
    with build_lock(out):
        result = qc(out)
    assert result.exit_code == 75 and "another batchseg run" in result.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--contamination", "0.7"], "--contamination must be in (0, 0.5)"),
        (["--contamination", "0.1", "--threshold", "3"], "at most one of --contamination and --threshold"),
        (["--method", "lof"], "Invalid value for '--method'"),
        (["--compare", "mcd,lof"], "unknown method 'lof'"),
        (["--dup-threshold", "1.5"], "--dup-threshold must be a cosine similarity"),
        (["--max-dim", "1"], "--max-dim must be at least 2"),
        (["--features", "pixels"], "Invalid value for '--features'"),
        (["--threshold", "-1"], "--threshold must be >= 0"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(build, args, fragment):
    _, out = build
    result = qc(out, *args)
    assert result.exit_code == 2 and fragment in result.output
    assert "Traceback" not in result.output and not (out / "qc").exists()


def test_missing_or_unbuilt_folder_exits_2(tmp_path):
    missing = qc(tmp_path / "nope")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = qc(tmp_path / "empty")
    assert empty.exit_code == 2 and "not a batchseg build" in empty.output


def test_help_teaches_with_examples():
    result = run_cli(["qc", "--help"])
    assert result.exit_code == 0
    for fragment in ("rglasso", "mogaal", "mcd", "--refit", "Examples:", "batchseg qc out/", "75"):
        assert fragment in result.output
