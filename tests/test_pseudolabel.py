"""`batchseg pseudolabel` end to end through the CLI, on builds made by `batchseg embed`."""
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchseg.io.tables import LABELS_SCHEMA, read_labels, read_manifest, round_folder, selftrain_folder
from batchseg.labels.rle import decode_mask
from helpers import embed_args, run_cli

CLASSES = "red thing,green thing,blue thing"
# Every round runs and is kept: tiny random models make the stopping and drift rules fire by chance.
FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0", "--epochs", "2", "-q",
        "--stop-agreement", "1", "--drift-tolerance", "1"]


@pytest.fixture(scope="session")
def _embedded_template(tmp_path_factory, _image_folder_template, tiny_models, dask_scheduler) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builds")
    builds = {}
    for name, extra in (("sam", []), ("nosam", ["--no-sam"])):
        result = run_cli(embed_args(_image_folder_template, root / name, tiny_models, "--scheduler", dask_scheduler, *extra))
        assert result.exit_code == 0, result.output
        builds[name] = root / name
    return builds


@pytest.fixture
def build(tmp_path, _embedded_template) -> Path:
    """A fresh copy of an embedded build (with SAM) of the 8 template images."""
    target = tmp_path / "build"
    shutil.copytree(_embedded_template["sam"], target)
    return target


def _label(out: Path, scheduler: str, *args: str):
    return run_cli(["pseudolabel", str(out), "--scheduler", scheduler, *args])


def _check_rows(out: Path, round_index: int, sources: set[str]) -> None:
    table = read_labels(out, round_index)
    assert table.schema.equals(LABELS_SCHEMA, check_metadata=False)
    assert set(table.column("source").to_pylist()) == sources
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in read_manifest(out).to_pylist()}
    semantic_cover: dict[tuple[str, str], np.ndarray] = {}
    for row in table.to_pylist():
        mask = decode_mask(row["mask"])
        assert mask.shape == sizes[row["image_id"]]  # original pixels, non-square images included
        assert row["area"] == int(mask.sum()) > 0
        ys, xs = np.nonzero(mask)
        assert row["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert 0.0 <= row["score"] <= 1.0 + 1e-6 and row["round"] == round_index
        assert row["class_name"] == CLASSES.split(",")[row["class_id"]]
        if row["kind"] == "semantic":
            key = (row["image_id"], row["source"])
            cover = semantic_cover.setdefault(key, np.zeros(mask.shape, dtype=np.int32))
            cover += mask
    assert semantic_cover and all(c.max() == 1 for c in semantic_cover.values())  # semantic rows never overlap


def test_rounds_are_written_schema_valid_and_a_rerun_does_nothing(build, dask_scheduler):
    result = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "2", *FAST)
    assert result.exit_code == 0, result.output
    for k in range(3):
        assert f"round {k}: 8 images" in result.output
    _check_rows(build, 0, {"maskclip", "sam"})
    _check_rows(build, 1, {"student", "sam"})
    _check_rows(build, 2, {"student", "sam"})
    assert pq.read_schema(next(round_folder(build, 0).glob("part-*.parquet"))).metadata[b"batchseg.schema"] == b"labels"
    instance = [r for r in read_labels(build, 0).to_pylist() if r["kind"] == "instance"]
    assert instance and all(r["source"] == "sam" for r in instance)

    again = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "2", *FAST)
    assert again.exit_code == 0
    assert again.output.count("already complete, skipped") == 3

    changed = _label(build, dask_scheduler, "--classes", "red thing,green thing", "--rounds", "1", *FAST)
    assert changed.exit_code == 0
    assert "round 0: 8 images" in changed.output and "round 1: 8 images" in changed.output
    assert set(read_labels(build, 0).column("class_name").to_pylist()) <= {"red thing", "green thing"}


def test_round_statistics_are_recorded(build, dask_scheduler):
    assert _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "1", *FAST).exit_code == 0
    import json

    info = json.loads((selftrain_folder(build, 1) / "_round.json").read_text())
    assert len(info["train"]["losses"]) == 2 and all(np.isfinite(info["train"]["losses"]))
    assert 0.0 <= info["stats"]["agreement_with_previous"] <= 1.0
    assert set(info["stats"]["class_histogram"]) == set(CLASSES.split(","))
    assert sum(info["stats"]["class_histogram"].values()) == info["stats"]["labelled_cells"] > 0


def test_without_sam_embeddings_maskclip_alone(tmp_path, _embedded_template, dask_scheduler):
    out = tmp_path / "nosam"
    shutil.copytree(_embedded_template["nosam"], out)
    result = _label(out, dask_scheduler, "--classes", CLASSES, "--rounds", "1", *FAST)
    assert result.exit_code == 0, result.output
    _check_rows(out, 0, {"maskclip"})
    _check_rows(out, 1, {"student"})
    asked = _label(out, dask_scheduler, "--classes", CLASSES, "--sam", *FAST)
    assert asked.exit_code == 2 and "no SAM embeddings" in asked.output


def test_switches_change_round_zero(build, dask_scheduler):
    base = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "0", "--no-sam", *FAST)
    assert base.exit_code == 0
    plain = read_labels(build, 0)
    ablated = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "0", "--no-sam", "--no-key-smoothing",
                     "--no-prompt-denoising", *FAST)
    assert ablated.exit_code == 0 and "round 0: 8 images" in ablated.output
    assert read_labels(build, 0).column("mask").to_pylist() != plain.column("mask").to_pylist()


@pytest.mark.parametrize(
    "make_out, args, fragment",
    [
        (lambda tmp, build: tmp / "missing", ["--classes", "cat"], "does not exist"),
        (lambda tmp, build: tmp, ["--classes", "cat"], "not a batchseg build"),
        (lambda tmp, build: build, ["--classes", " , "], "empty"),
        (lambda tmp, build: build, [], "exactly one of --classes or --vocab"),
        (lambda tmp, build: build, ["--classes", "cat", "--rounds", "-1"], "--rounds"),
        (lambda tmp, build: build, ["--classes", "cat", "--rounds", "1000000"], "--rounds must be between 0 and 50"),
        (lambda tmp, build: build, ["--classes", "cat", "--epochs", "999999999"], "epochs must be an integer in"),
        (lambda tmp, build: build, ["--classes", "cat", "--points-per-side", "100000"], "at most 256"),
        (lambda tmp, build: build, ["--classes", "cat", "--dense-head", "dino"], "proxy-sam"),
        (lambda tmp, build: build, ["--classes", "cat", "--proxy-grid", "0"], "proxy_grid must be an integer in [1, 256]"),
        (lambda tmp, build: build, ["--classes", "cat", "--conf-thresh", "2"], "conf_thresh"),
        (lambda tmp, build: build, ["--classes", "cat,Cat"], "duplicate"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, build, dask_scheduler, make_out, args, fragment):
    result = _label(make_out(tmp_path, build), dask_scheduler, *args, "-q")
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_vocab_file_with_synonyms_and_background(build, tmp_path, dask_scheduler):
    vocab = tmp_path / "classes.txt"
    vocab.write_text("# shapes\nred thing|crimson thing\ngreen thing\n")
    result = _label(build, dask_scheduler, "--vocab", str(vocab), "--background", "--rounds", "0", "--no-sam", *FAST)
    assert result.exit_code == 0, result.output
    names = set(read_labels(build, 0).column("class_name").to_pylist())
    assert names <= {"red thing", "green thing", "background"}
    assert len(list((build / "text").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("head", ["maskclip", "value", "clearclip", "sclip", "naclip", "proxy-sam"])
def test_every_dense_head_labels_a_build_without_re_embedding(build, dask_scheduler, head):
    before = {p: p.stat().st_mtime_ns for p in (build / "embeddings.zarr").rglob("*") if p.is_file()}
    result = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "1", "--dense-head", head, *FAST)
    assert result.exit_code == 0, result.output
    _check_rows(build, 0, {"maskclip", "sam"})
    _check_rows(build, 1, {"student", "sam"})
    after = {p: p.stat().st_mtime_ns for p in (build / "embeddings.zarr").rglob("*") if p.is_file()}
    assert after == before  # the store is read, never rewritten


def test_changing_the_head_or_the_vote_recomputes_round_zero(build, dask_scheduler):
    assert _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "0", *FAST).exit_code == 0
    for extra in (["--dense-head", "naclip"], ["--dense-head", "naclip", "--region-vote", "majority"]):
        result = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "0", *extra, *FAST)
        assert result.exit_code == 0 and "round 0: 8 images" in result.output, result.output


def test_unknown_head_lists_the_heads(build, dask_scheduler):
    result = _label(build, dask_scheduler, "--classes", CLASSES, "--dense-head", "dino", "-q")
    assert result.exit_code == 2
    for name in ("maskclip", "clearclip", "sclip", "naclip", "proxy-sam"):
        assert name in result.output


def test_proxy_sam_needs_sam_embeddings(tmp_path, _embedded_template, dask_scheduler):
    out = tmp_path / "nosam"
    shutil.copytree(_embedded_template["nosam"], out)
    result = _label(out, dask_scheduler, "--classes", CLASSES, "--dense-head", "proxy-sam", *FAST)
    assert result.exit_code == 2 and "uses the stored SAM embeddings" in result.output


def test_labels_folder_reads_as_a_hive_dataset(build, dask_scheduler):
    import pyarrow.dataset as pads

    assert _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "1", *FAST).exit_code == 0
    table = pads.dataset(build / "labels", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == read_labels(build, 0).num_rows + read_labels(build, 1).num_rows
    assert pq.read_table(round_folder(build, 1)).num_rows == read_labels(build, 1).num_rows
    import duckdb
    import pandas as pd

    frame = pd.read_parquet(build / "labels")
    assert len(frame) == table.num_rows and set(frame["round"].astype(int)) == {0, 1}
    pattern = str(build / "labels" / "*" / "*.parquet")
    counted = duckdb.sql(f"select count(*) from read_parquet('{pattern}', hive_partitioning=true)").fetchone()[0]
    assert counted == table.num_rows
    for folder in ("manifest",):
        assert len(pd.read_parquet(build / folder)) == read_manifest(build).num_rows
    assert sorted(p.name for p in (selftrain_folder(build, 1)).iterdir()) == [
        "_round.json", "grid.zarr", "head.json", "head.safetensors"]


def test_a_version_1_build_is_refused_with_how_to_re_embed(build, dask_scheduler):
    import json

    info = json.loads((build / "batchseg.json").read_text())
    info["schema_version"] = 1
    (build / "batchseg.json").write_text(json.dumps(info))
    result = _label(build, dask_scheduler, "--classes", CLASSES, "-q")
    assert result.exit_code == 2 and "version-1 build" in result.output and "--overwrite" in result.output


def test_stopping_rule_ends_self_training_and_says_why(build, dask_scheduler):
    import json

    full = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "3", "--stop-agreement", "1", *FAST)
    assert full.exit_code == 0 and "round 3: 8 images" in full.output
    result = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "3", *FAST, "--stop-agreement", "0.01")
    assert result.exit_code == 0, result.output
    assert "self-training stopped after round 1: converged" in result.output
    assert not (build / "labels" / "round=2").exists() and not (build / "selftrain" / "round=3").exists()
    info = json.loads((selftrain_folder(build, 1) / "_round.json").read_text())
    assert info["decision"]["stop"] is True and "stop_agreement 0.01" in info["decision"]["why"]
    again = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "3", *FAST, "--stop-agreement", "0.01")
    assert again.output.count("already complete, skipped") == 2 and "stopped after round 1" in again.output


def test_a_round_that_drifts_is_set_aside_and_the_round_before_is_the_result(build, dask_scheduler, monkeypatch):
    import json

    import batchseg.stages.pseudolabel_train as train
    from batchseg.io.build_info import label_rounds
    from batchseg.io.tables import set_aside_folder

    # Round 2 overturns more of round 0's surest cells than round 1 did.
    monkeypatch.setattr(train, "anchor_agreement", lambda out, k, rows, c: None if k == 0 else 1.0 - 0.01 * k)
    args = ["--classes", CLASSES, "--rounds", "3", *FAST, "--drift-tolerance", "0.005"]
    result = _label(build, dask_scheduler, *args)
    assert result.exit_code == 0, result.output
    assert "round 2 discarded, round 1's labels are the result: drifted" in result.output
    assert "round 3" not in result.output
    assert label_rounds(build) == [0, 1]
    assert sorted(p.suffix for p in set_aside_folder(build, 2).iterdir()) == [".parquet"]
    info = json.loads((selftrain_folder(build, 2) / "_round.json").read_text())
    assert info["discarded"] is True and info["decision"]["discard"] is True
    assert "0.9800" in info["decision"]["why"] and "0.9900" in info["decision"]["why"]

    # Killed between the record and the move: a rerun moves the labels, and computes nothing.
    set_aside_folder(build, 2).replace(round_folder(build, 2))
    again = _label(build, dask_scheduler, *args)
    assert again.exit_code == 0 and again.output.count("already complete, skipped") == 3, again.output
    assert label_rounds(build) == [0, 1] and set_aside_folder(build, 2).is_dir()

    kept = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "3", *FAST, "--drift-tolerance", "1")
    assert kept.exit_code == 0 and "round 3: 8 images" in kept.output
    assert label_rounds(build) == [0, 1, 2, 3]


def test_later_rounds_label_with_the_mean_of_every_rounds_head(build, dask_scheduler):
    args = ["--classes", CLASSES, "--rounds", "2", *FAST]
    assert _label(build, dask_scheduler, *args, "--no-ensemble").exit_code == 0
    single = {k: read_labels(build, k).to_pylist() for k in (1, 2)}
    result = _label(build, dask_scheduler, *args, "--ensemble")
    assert result.exit_code == 0 and "round 2: 8 images" in result.output, result.output
    assert "round 1: 8 images" in result.output  # the setting is part of every round's key
    assert read_labels(build, 1).to_pylist() == single[1]  # round 1 has no earlier head: the same labels
    assert read_labels(build, 2).to_pylist() != single[2]


def test_images_flagged_by_qc_are_left_out_unless_asked(build, dask_scheduler, monkeypatch):
    import batchseg.stages.pseudolabel as stage

    victim = read_manifest(build).to_pylist()[0]["image_id"]
    monkeypatch.setattr(stage, "flagged_image_ids", lambda out: frozenset({victim}))
    result = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "0", "--no-sam", *FAST)
    assert result.exit_code == 0 and "left out 1 images flagged by batchseg qc" in result.output
    assert victim not in set(read_labels(build, 0).column("image_id").to_pylist())
    kept = _label(build, dask_scheduler, "--classes", CLASSES, "--rounds", "0", "--no-sam", "--include-flagged", *FAST)
    assert kept.exit_code == 0 and "left out" not in kept.output
    assert victim in set(read_labels(build, 0).column("image_id").to_pylist())


@pytest.mark.parametrize("background, bg_mask_vote, painted", [
    (True, False, [0, -1, 1]),  # a mask recognised as background paints nothing
    (True, True, [0, 2, 1]),
    (False, False, [0, 2, 1]),  # without a background class every class paints
])
def test_masks_recognised_as_background_do_not_repaint(background, bg_mask_vote, painted):
    from types import SimpleNamespace

    import torch

    from batchseg.labels.recognise import refine_semantic
    from batchseg.stages.pseudolabel_shard import _painting_classes

    ctx = SimpleNamespace(settings=SimpleNamespace(background=background, bg_mask_vote=bg_mask_vote),
                          names=("cat", "dog", "background"))
    classes = _painting_classes(ctx, np.array([0, 2, 1]))
    assert classes.tolist() == painted
    # MaskCLIP says dog on the right half; mask 1 (recognised as background) covers it.
    probs = torch.zeros(3, 2, 4)
    probs[0, :, :2] = 1
    probs[1, :, 2:] = 1
    masks = np.zeros((3, 2, 4), dtype=bool)
    masks[1, :, 2:] = True
    refined = refine_semantic(probs, torch.from_numpy(masks), torch.ones(3), class_ids=torch.from_numpy(classes))
    assert refined[:, 2:].unique().tolist() == ([1] if painted[1] == -1 else [2])
