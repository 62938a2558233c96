"""`batchseg export` end to end on a build labelled with the synthetic world's exact truth."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from filelock import FileLock
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from batchseg.cli import cli
from batchseg.export.polygons import rasterise
from batchseg.io.build_info import manifest_summary
from batchseg.io.lock import LOCK_NAME
from batchseg.io.tables import labels_table, round_folder, write_part_atomic
from batchseg.labels.rle import decode_mask
from batchseg.stages import export as export_stage
from batchseg.stages.export_plan import assign_split
from batchseg.testing_labels import RUN_ID, image_rows, write_labelled_build
from batchseg.world import CLASS_NAMES, render_sample, semantic_to_class_ids

COUNT = 8


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_labelled_build(tmp_path_factory.mktemp("labelled"), COUNT, seed=3, rounds=1, shard_size=3)


def export(*args) -> object:
    return CliRunner().invoke(cli, ["export", *map(str, args), "-q"], catch_exceptions=False)


def _ids(build) -> dict[str, int]:
    """image id -> world index."""
    images = manifest_summary(build.out).images
    return {image_id: int(Path(image.path).stem.split("_")[1]) for image_id, image in images.items()}


# ------------------------------------------------------------------------------ coco


def test_coco_loads_and_scores_ap_1_against_itself(labelled, tmp_path):
    result = export(labelled.out, tmp_path / "ds", "--format", "coco")
    assert result.exit_code == 0, result.output
    path = tmp_path / "ds" / "annotations" / "instances_train.json"
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == COUNT
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    ids = _ids(labelled)
    expected = sum(len(np.unique(render_sample(3, i).semantic)) - (0 in render_sample(3, i).semantic) for i in ids.values())
    assert len(coco.getAnnIds()) == expected  # one semantic row per class and image, round 1 source sam
    for image in coco.loadImgs(coco.getImgIds()):
        truth = render_sample(3, ids[image["batchseg_image_id"]])
        assert (image["height"], image["width"]) == truth.semantic.shape
        assert (tmp_path / "ds" / "images" / "train" / image["file_name"]).is_file()
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), truth.semantic == ann["category_id"])
    for iou_type in ("segm", "bbox"):
        evaluation = COCOeval(coco, coco.loadRes(coco.loadAnns(coco.getAnnIds())), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]


def test_coco_instances_with_min_score_and_source(labelled, tmp_path):
    result = export(labelled.out, tmp_path / "ds", "--format", "coco", "--kind", "instance", "--round", "0",
                    "--min-score", "0.6", "--images", "none")
    assert result.exit_code == 0, result.output
    coco = COCO(str(tmp_path / "ds" / "annotations" / "instances_train.json"))
    ids = _ids(labelled)
    expected = [r for image_id, index in ids.items() for r in image_rows(3, index, image_id, 0)
                if r["kind"] == "instance" and r["score"] >= 0.6]
    assert len(coco.getAnnIds()) == len(expected) > 0
    assert sorted(round(a["score"], 4) for a in coco.loadAnns(coco.getAnnIds())) == \
        sorted(round(r["score"], 4) for r in expected)
    assert not (tmp_path / "ds" / "images").exists()


# ------------------------------------------------------------------------------ png


def test_png_maps_equal_the_labels_at_original_size(labelled, tmp_path):
    result = export(labelled.out, tmp_path / "ds", "--format", "png", "--source", "maskclip", "--round", "0",
                    "--split", "val=0.5", "--images", "link")
    assert result.exit_code == 0, result.output
    ds = tmp_path / "ds"
    assert (ds / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
    legend = json.loads((ds / "legend.json").read_text())
    assert legend["ignore_value"] == 255 and [c["name"] for c in legend["classes"]] == list(CLASS_NAMES)
    images = manifest_summary(labelled.out).images
    found = 0
    for image_id, index in _ids(labelled).items():
        split = assign_split(image_id, (("val", 0.5),), 0)
        stem = Path(images[image_id].path).stem
        with Image.open(ds / "labels" / split / f"{stem}.png") as img:
            assert img.mode == "P"
            values = np.asarray(img)
        expected = semantic_to_class_ids(render_sample(3, index).semantic, background=255)
        np.testing.assert_array_equal(values, expected.astype(np.uint8))
        link = ds / "images" / split / images[image_id].path
        assert link.is_symlink() and link.resolve() == (labelled.images / images[image_id].path).resolve()
        found += 1
    assert found == COUNT
    assert {p.parent.name for p in (ds / "labels").rglob("*.png")} == {"train", "val"}


def test_png_min_score_leaves_low_rows_unlabelled(labelled, tmp_path):
    result = export(labelled.out, tmp_path / "ds", "--format", "png", "--min-score", "0.7", "--images", "none",
                    "--ignore-value", "200")
    assert result.exit_code == 0, result.output
    for image_id, index in _ids(labelled).items():
        rows = [r for r in image_rows(3, index, image_id, 1) if r["source"] == "sam" and r["kind"] == "semantic"]
        stem = f"s3_{index:06d}"
        values = np.asarray(Image.open(tmp_path / "ds" / "labels" / "train" / f"{stem}.png"))
        expected = np.full(values.shape, 200, dtype=np.uint8)
        for row in rows:
            if row["score"] >= 0.7:
                expected[decode_mask(row["mask"])] = row["class_id"]
        np.testing.assert_array_equal(values, expected)


# ------------------------------------------------------------------------------ yolo


def _read_yolo(path: Path, height: int, width: int) -> list[tuple[int, np.ndarray]]:
    lines = []
    for line in path.read_text().splitlines():
        values = line.split()
        coords = np.array(values[1:], dtype=np.float64).reshape(-1, 2) * [width, height]
        lines.append((int(values[0]), coords))
    return lines


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("kind", ["instance", "semantic"])
def test_yolo_polygons_match_the_masks(labelled, tmp_path, kind):
    result = export(labelled.out, tmp_path / "ds", "--format", "yolo", "--kind", kind, "--split", "val=0.25")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((tmp_path / "ds" / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(CLASS_NAMES)) and data["train"] == "images/train"
    assert data["val"] == "images/val" and Path(data["path"]) == (tmp_path / "ds").resolve()
    ious = []
    for image_id, index in _ids(labelled).items():
        truth = render_sample(3, index)
        h, w = truth.semantic.shape
        split = assign_split(image_id, (("val", 0.25),), 0)
        image_path = tmp_path / "ds" / "images" / split / f"s3_{index:06d}.png"
        assert image_path.is_file()
        label_path = Path(str(image_path).replace("/images/", "/labels/")).with_suffix(".txt")  # Ultralytics' rule
        lines = _read_yolo(label_path, h, w)
        if kind == "instance":
            assert [c for c, _ in lines] == [o.class_id for o in truth.objects]
            ious += [_iou(rasterise([poly], h, w), obj.mask) for (_, poly), obj in zip(lines, truth.objects)]
        else:
            for class_id in {o.class_id for o in truth.objects}:
                drawn = rasterise([p for c, p in lines if c == class_id], h, w)
                ious.append(_iou(drawn, truth.semantic == class_id + 1))
    assert len(ious) >= COUNT and min(ious) >= 0.9, ious


def test_yolo_tolerance_zero_traces_every_boundary_pixel(labelled, tmp_path):
    result = export(labelled.out, tmp_path / "ds", "--format", "yolo", "--kind", "instance", "--tolerance", "0",
                    "--images", "none")
    assert result.exit_code == 0, result.output
    for index in _ids(labelled).values():
        truth = render_sample(3, index)
        h, w = truth.semantic.shape
        lines = _read_yolo(tmp_path / "ds" / "labels" / "train" / f"s3_{index:06d}.txt", h, w)
        for (_, poly), obj in zip(lines, truth.objects):
            assert _iou(rasterise([poly], h, w), obj.mask) >= 0.97  # 6 decimals of normalised coordinates


# ------------------------------------------------------------------------------ splits and reruns


def test_split_is_seeded_stable_and_near_its_fraction(labelled, tmp_path):
    ids = [f"{i:064x}" for i in range(20000)]
    val = [assign_split(i, (("val", 0.1),), 0) == "val" for i in ids]
    assert 0.09 < np.mean(val) < 0.11
    assert val == [assign_split(i, (("val", 0.1),), 0) == "val" for i in reversed(ids)][::-1]  # order-free
    assert val != [assign_split(i, (("val", 0.1),), 1) == "val" for i in ids]  # the seed matters
    three = [assign_split(i, (("val", 0.1), ("test", 0.2)), 0) for i in ids[:5000]]
    assert 0.17 < three.count("test") / 5000 < 0.23
    # A bigger build (the same first images plus more) keeps every earlier image's split.
    bigger = write_labelled_build(tmp_path / "bigger", COUNT + 4, seed=3, rounds=0, evaluation=False)
    splits = {}
    for build, dest in ((labelled, tmp_path / "a"), (bigger, tmp_path / "b")):
        assert export(build.out, dest, "--format", "png", "--split", "val=0.5", "--images", "none").exit_code == 0
        splits[dest.name] = {p.name: p.parent.name for p in (dest / "labels").rglob("*.png")}
    assert len(splits["b"]) == COUNT + 4
    assert all(splits["b"][name] == split for name, split in splits["a"].items())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name not in ("_export.json", "data.yaml") and "_export" not in p.parts
            and not p.name.startswith("instances_")}


def test_rerun_is_incremental_and_a_killed_run_finishes_on_rerun(tmp_path, monkeypatch):
    build = write_labelled_build(tmp_path / "b", 6, seed=5, rounds=0, shard_size=2, evaluation=False)
    clean = tmp_path / "clean"
    assert export(build.out, clean, "--format", "yolo").exit_code == 0
    # A run that dies after its first label part ...
    original, calls = export_stage._write_unit, []

    def dying(*args, **kwargs):
        if calls:
            raise RuntimeError("killed")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(export_stage, "_write_unit", dying)
    with pytest.raises(RuntimeError, match="killed"):
        CliRunner().invoke(cli, ["export", str(build.out), str(tmp_path / "ds"), "--format", "yolo", "-q"],
                           catch_exceptions=False)
    monkeypatch.setattr(export_stage, "_write_unit", original)
    assert not (tmp_path / "ds" / "data.yaml").exists()
    # ... is finished by a rerun, which writes only the two missing parts
    result = export(build.out, tmp_path / "ds", "--format", "yolo")
    assert result.exit_code == 0 and "2 label parts written, 1 already done" in result.output
    assert _snapshot(tmp_path / "ds") == _snapshot(clean)
    # New labelled images: one more part, only it is read
    rows = image_rows(5, 0, "new-image", 0)
    write_part_atomic(labels_table(rows), round_folder(build.out, 0) / f"part-{RUN_ID}-00099.parquet")
    result = export(build.out, tmp_path / "ds", "--format", "yolo")
    assert result.exit_code == 0 and "1 label parts written, 3 already done" in result.output
    assert "1 labelled images are no longer in the manifest" in result.output
    # A part that disappears takes its files with it
    (round_folder(build.out, 0) / f"part-{RUN_ID}-00000.parquet").unlink()
    result = export(build.out, tmp_path / "ds", "--format", "yolo")
    assert result.exit_code == 0 and "4 images" in result.output
    assert len(list((tmp_path / "ds" / "labels").rglob("*.txt"))) == 4
    assert len(list((tmp_path / "ds" / "images").rglob("*.png"))) == 4


def test_coco_rerun_appends_new_parts(tmp_path):
    build = write_labelled_build(tmp_path / "b", 4, seed=5, rounds=0, shard_size=2, evaluation=False)
    assert export(build.out, tmp_path / "ds", "--format", "coco", "--images", "none").exit_code == 0
    first = json.loads((tmp_path / "ds" / "annotations" / "instances_train.json").read_text())
    image_id = manifest_summary(build.out).images
    rows = [dict(r, image_id=next(iter(image_id))) for r in image_rows(5, 0, "x", 0)]
    (round_folder(build.out, 0) / f"part-{RUN_ID}-00000.parquet").unlink()
    write_part_atomic(labels_table(rows), round_folder(build.out, 0) / f"part-{RUN_ID}-00050.parquet")
    result = export(build.out, tmp_path / "ds", "--format", "coco", "--images", "none")
    assert result.exit_code == 0, result.output
    second = json.loads((tmp_path / "ds" / "annotations" / "instances_train.json").read_text())
    assert len(second["images"]) == len(first["images"]) - 1  # two images gone, one back
    assert [a["id"] for a in second["annotations"]] == list(range(1, len(second["annotations"]) + 1))


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("args, message", [
    (["--format", "coco", "--round", "7"], "--round 7 has no labels"),
    (["--format", "coco", "--source", "student", "--round", "0"], "--source must be one of: maskclip, sam"),
    (["--format", "png", "--kind", "instance"], "use --kind semantic"),
    (["--format", "coco", "--split", "val=1.5"], "--split takes NAME=FRACTION"),
    (["--format", "coco", "--split", "val=0.6,test=0.5"], "add up to less than 1"),
    (["--format", "coco", "--min-score", "2"], "--min-score must be in [0, 1]"),
    (["--format", "png", "--ignore-value", "5"], "--ignore-value 5 is a class id"),
    (["--format", "coco", "--src", "/nonexistent-folder"], "--src /nonexistent-folder is not a folder"),
    (["--format", "tiff"], "Invalid value for '--format'"),
])
def test_bad_options_exit_2_with_one_line(labelled, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["export", str(labelled.out), str(tmp_path / "ds"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_dest_rules(labelled, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export", str(labelled.out), str(foreign), "--format", "coco"])
    assert result.exit_code == 2 and "holds no batchseg export" in result.output
    assert export(labelled.out, tmp_path / "ds", "--format", "coco", "--images", "none").exit_code == 0
    result = CliRunner().invoke(cli, ["export", str(labelled.out), str(tmp_path / "ds"), "--format", "coco",
                                      "--images", "none", "--min-score", "0.5"])
    assert result.exit_code == 2 and "min_score: 0.0 -> 0.5" in result.output and "--overwrite" in result.output
    result = export(labelled.out, tmp_path / "ds", "--format", "coco", "--images", "none", "--min-score", "0.5",
                    "--overwrite")
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nothing"), str(tmp_path / "x"), "--format", "coco"])
    assert result.exit_code == 2 and "is not a batchseg build" in result.output
    lock = FileLock(str(tmp_path / "ds" / LOCK_NAME))
    with lock:
        result = CliRunner().invoke(cli, ["export", str(labelled.out), str(tmp_path / "ds"), "--format", "coco",
                                          "--images", "none", "--min-score", "0.5"])
    assert result.exit_code == 75 and "another batchseg run" in result.output
    records = [json.loads(p.read_text()) for p in (labelled.out / "runs").glob("*.json")]
    assert any(r["command"] == "export" and r["status"] == "finished" for r in records)


def test_overwrite_starts_over_and_stale_vocabularies_are_refused(tmp_path):
    build = write_labelled_build(tmp_path / "b", 3, seed=5, rounds=0, evaluation=False)
    assert export(build.out, tmp_path / "ds", "--format", "png", "--images", "none").exit_code == 0
    (tmp_path / "ds" / "labels" / "train" / "leftover.png").write_bytes(b"x")
    result = export(build.out, tmp_path / "ds", "--format", "png", "--images", "none", "--overwrite")
    assert result.exit_code == 0 and "1 label parts written, 0 already done" in result.output  # all again
    assert not (tmp_path / "ds" / "labels" / "train" / "leftover.png").exists()
    assert len(list((tmp_path / "ds" / "labels").rglob("*.png"))) == 3
    (build.out / "batchseg.json").write_text(json.dumps({"schema_version": 1, "pseudolabel": {"labels": {
        "classes": ["cat", "dog"]}}}))
    result = CliRunner().invoke(cli, ["export", str(build.out), str(tmp_path / "ds2"), "--format", "coco"])
    assert result.exit_code == 2 and "labelled with another vocabulary" in result.output


def test_missing_source_images_are_a_usage_error(tmp_path):
    build = write_labelled_build(tmp_path / "b", 2, seed=5, rounds=0, evaluation=False)
    os.rename(build.images, tmp_path / "moved")
    result = CliRunner().invoke(cli, ["export", str(build.out), str(tmp_path / "ds"), "--format", "yolo"])
    assert result.exit_code == 2 and "pass --src FOLDER, or --images none" in result.output
    result = export(build.out, tmp_path / "ds", "--format", "yolo", "--src", tmp_path / "moved")
    assert result.exit_code == 0, result.output
