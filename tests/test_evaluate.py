"""`batchseg evaluate` on tiny builds written by hand (no models): numbers vs hand-computed IoUs."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batchseg.cli import cli
from batchseg.config import BUILD_FILE, BUILD_SCHEMA_VERSION
from batchseg.io.files import write_json_atomic
from batchseg.io.tables import labels_table, manifest_table, round_folder, write_part_atomic
from batchseg.labels.rle import encode_label_map, encode_mask, rle_area, rle_bbox_xywh
from batchseg.stages.evaluate import EVAL_SCHEMA, EvaluateConfig, run_evaluate

IDS = {"a/img1.jpg": "id-a", "b/img2.jpg": "id-b", "c/img3.jpg": "id-c"}
SIZES = {"id-a": (2, 4), "id-b": (2, 2), "id-c": (3, 3)}  # (height, width)


def _manifest(out: Path) -> None:
    rows = [
        {"image_id": IDS[path], "path": path, "width": SIZES[IDS[path]][1], "height": SIZES[IDS[path]][0],
         "status": "ok", "run_id": "20250101T000000Z-aaaaaa"}
        for path in IDS
    ]
    rows.append({"image_id": None, "path": "a/broken.jpg", "status": "truncated", "run_id": "20250101T000000Z-aaaaaa"})
    write_part_atomic(manifest_table(rows), out / "manifest" / "part-00000.parquet")


def _rows(image_id: str, label: np.ndarray, names: list[str], source: str, round_index: int,
          kind: str = "semantic") -> list[dict]:
    rows = []
    for segment, (class_id, rle) in enumerate(encode_label_map(np.asarray(label), ignore=-1)):
        rows.append({
            "image_id": image_id, "kind": kind, "segment_id": segment, "class_id": class_id,
            "class_name": names[class_id], "score": 0.9, "source": source, "round": round_index,
            "bbox": list(rle_bbox_xywh(rle)), "area": rle_area(rle), "mask": rle,
        })
    return rows


def _write_round(out: Path, round_index: int, rows: list[dict]) -> None:
    write_part_atomic(labels_table(rows), round_folder(out, round_index) / "part-00000.parquet")


def _build(tmp_path: Path, names: list[str], rounds: dict[int, list[tuple[str, str, list]]],
           build_file: bool = True) -> Path:
    """A build folder: manifest + label rounds {round: [(image_id, source, label map)]}."""
    out = tmp_path / "out"
    _manifest(out)
    if build_file:
        write_json_atomic(out / BUILD_FILE, {"schema_version": BUILD_SCHEMA_VERSION,
                                             "pseudolabel": {"labels": {"classes": names}}})
    for round_index, entries in rounds.items():
        rows = []
        for image_id, source, label in entries:
            rows += _rows(image_id, np.array(label), names, source, round_index)
        _write_round(out, round_index, rows)
    return out


def _png(path: Path, values, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.array(values, dtype=np.uint8))
    if mode == "P":  # the same indices, shown in colours
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        assert img.mode == "P"
    elif mode == "RGB":
        img = img.convert("RGB")
    img.save(path)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)], catch_exceptions=False)


def _results(out: Path) -> tuple[dict, dict]:
    """The single evaluation's JSON, and its Parquet rows keyed by (round, source, class name)."""
    (json_path,) = sorted((out / "eval").glob("*.json"))
    (parquet_path,) = sorted((out / "eval").glob("*.parquet"))
    assert json_path.stem == "_" + parquet_path.stem
    # The folder is a Parquet dataset: the summary's underscore keeps readers off it.
    import pandas as pd

    assert len(pd.read_parquet(out / "eval")) == pq.read_table(parquet_path).num_rows
    data = json.loads(json_path.read_text())
    table = pq.read_table(parquet_path)
    assert table.schema.equals(EVAL_SCHEMA, check_metadata=True)
    rows = {(r["round"], r["source"], r["class_name"]): r for r in table.to_pylist()}
    return data, rows


def _by_key(data: dict) -> dict:
    return {(r["round"], r["source"]): r for r in data["results"]}


# --------------------------------------------------------------------- PNG ground truth

NAMES = ["cat", "dog"]
# image a (2x4) ground truth, VOC style (offset 1): 1 = cat, 2 = dog, 0 = background, 255 = ignore
GT_A = [[1, 1, 2, 0],
        [1, 255, 2, 2]]
GT_B = [[2, 2],
        [2, 2]]  # all dog
PNG_ROUNDS = {
    0: [
        ("id-a", "maskclip", [[0, 1, 1, 1], [0, 0, 1, 0]]),
        ("id-a", "sam", [[0, 0, 1, 1], [0, 0, 1, -1]]),  # (1, 3) unlabelled: no row covers it
        ("id-b", "maskclip", [[1, 1], [0, 0]]),
        ("id-b", "sam", [[1, 1], [1, 1]]),
        ("id-c", "maskclip", [[0, 0, 0]] * 3),  # no ground truth for c
        ("id-c", "sam", [[0, 0, 0]] * 3),
    ],
    1: [  # image b not labelled in round 1
        ("id-a", "student", [[0, 0, 0, 0], [0, 0, 0, 0]]),
        ("id-a", "sam", [[0, 0, 1, 1], [0, 0, 1, -1]]),
    ],
}
# Hand-computed (background of a and pixel 255 not scored: no background class):
# round 0 maskclip, a: cat tp 2 fp 1 fn 1, dog tp 2 fp 1 fn 1; b: dog tp 2 fn 2, cat fp 2
#   -> cat 2/6, dog 4/8, acc 6/10
# round 0 sam, a: cat 3/3, dog tp 2 fn 1 (unlabelled); b: dog 4/4 -> cat 1, dog 6/7, acc 9/10
# round 1 student, a only: cat tp 3 fp 3 -> 3/6, dog 0/3 -> acc 3/6
# round 1 sam, a only: cat 1, dog 2/3, acc 5/6
EXPECTED_PNG = {
    (0, "maskclip"): (2, {"cat": 2 / 6, "dog": 4 / 8}, 6 / 10),
    (0, "sam"): (2, {"cat": 1.0, "dog": 6 / 7}, 9 / 10),
    (1, "student"): (1, {"cat": 3 / 6, "dog": 0.0}, 3 / 6),
    (1, "sam"): (1, {"cat": 1.0, "dog": 2 / 3}, 5 / 6),
}


@pytest.fixture
def png_gt(tmp_path) -> Path:
    gt = tmp_path / "gt"
    _png(gt / "a" / "img1.png", GT_A)  # same subfolder as its image
    _png(gt / "img2.png", GT_B, mode="P")  # flat, palette: raw indices are read
    _png(gt / "zzz" / "nothing.png", GT_B)  # matches no image: a note
    return gt


@pytest.mark.parametrize("build_file", [True, False], ids=["vocab-from-build-file", "vocab-from-rows"])
def test_png_ground_truth(tmp_path, png_gt, build_file):
    out = _build(tmp_path, NAMES, PNG_ROUNDS, build_file=build_file)
    # instance rows must not be scored
    _write_round(out, 0, _rows("id-a", np.ones((2, 4), int), NAMES, "sam", 0, kind="instance")
                 + [r for e in PNG_ROUNDS[0] for r in _rows(e[0], np.array(e[2]), NAMES, e[1], 0)])
    result = invoke(out, "--gt", png_gt)
    assert result.exit_code == 0, result.output
    data, rows = _results(out)
    assert data["classes"] == NAMES and data["gt_format"] == "png" and not data["background_scored"]
    assert {(m["gt"], m["path"]) for m in data["images"]} == {("a/img1.png", "a/img1.jpg"), ("img2.png", "b/img2.jpg")}
    assert any("zzz/nothing.png" in note for note in data["notes"])
    results = _by_key(data)
    assert list(results) == list(EXPECTED_PNG)  # ordered by round, then maskclip/student before sam
    for key, (images, ious, acc) in EXPECTED_PNG.items():
        r = results[key]
        assert r["images"] == images
        assert r["pixel_accuracy"] == pytest.approx(acc)
        assert r["miou"] == pytest.approx(np.mean(list(ious.values())))
        per_class = {c["class_name"]: c["iou"] for c in r["per_class"]}
        assert per_class == pytest.approx(ious)
        for name, iou in ious.items():
            row = rows[(*key, name)]
            assert row["iou"] == pytest.approx(iou) and row["images"] == images
            assert row["miou"] == pytest.approx(r["miou"])
            assert row["intersection"] / row["union"] == pytest.approx(iou)
    assert results[(0, "sam")]["unlabelled_pixels"] == 1
    assert results[(0, "maskclip")]["total_pixels"] == 10
    # the table on stdout
    assert "round" in result.output and "mIoU" in result.output and "cat" in result.output
    assert "41.7" in result.output  # round 0 maskclip mIoU (2/6 + 4/8) / 2
    assert "note:" in result.output and "background pixels are not scored" in result.output


def test_png_offset_zero_and_ignore(tmp_path):
    out = _build(tmp_path, NAMES, {0: [("id-a", "maskclip", [[0, 1, 1, 1], [0, 0, 1, 0]])]})
    gt = tmp_path / "gt"
    _png(gt / "a" / "img1.png", [[0, 0, 1, 9], [0, 9, 1, 1]])  # class ids; 9 ignored
    report = run_evaluate(EvaluateConfig(out=out, gt=gt, ignore_index=9, gt_offset=0))
    (r,) = report.results
    # cat gt {(0,0),(0,1),(1,0)} pred cat scored {(0,0),(1,0),(1,3)}: 2/4; dog gt 3 px, pred dog scored 3 px, tp 2: 2/4
    assert r.scores.iou.tolist() == pytest.approx([0.5, 0.5])
    assert r.scores.pixel_accuracy == pytest.approx(4 / 6)


def test_background_class_scores_background(tmp_path):
    names = ["cat", "dog", "background"]
    out = _build(tmp_path, names, {0: [("id-a", "maskclip", [[0, 1, 1, 2], [0, 0, 2, 2]])]})
    gt = tmp_path / "gt"
    _png(gt / "a" / "img1.png", GT_A)
    report = run_evaluate(EvaluateConfig(out=out, gt=gt))
    (r,) = report.results
    # gt: cat {(0,0),(0,1),(1,0)}, dog {(0,2),(1,2),(1,3)}, background {(0,3)}; (1,1) ignored
    # cat: tp 2 ((0,1) predicted dog) -> 2/3; dog: tp 1, fp (0,1), fn (1,2),(1,3) -> 1/4; bg: tp 1, fp 2 -> 1/3
    assert r.scores.iou.tolist() == pytest.approx([2 / 3, 1 / 4, 1 / 3])
    assert r.scores.pixel_accuracy == pytest.approx(4 / 7)
    assert report.background_scored


# --------------------------------------------------------------------- COCO ground truth

def _coco(path: Path) -> Path:
    dog = np.zeros((2, 4), bool)
    dog[0, 1:3] = True
    data = {
        "images": [
            {"id": 1, "file_name": "photos/a/img1.jpg", "height": 2, "width": 4},  # leading folder dropped
            {"id": 2, "file_name": "unknown.jpg", "height": 5, "width": 5},
        ],
        "categories": [{"id": 7, "name": "Cat"}, {"id": 9, "name": "DOG"}, {"id": 3, "name": "person"}],
        "annotations": [
            # a polygon: the 2x2 block of columns 0-1, rows 0-1
            {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
            # compressed RLE painted over the cat at (0, 1)
            {"id": 2, "image_id": 1, "category_id": 9, "iscrowd": 0, "segmentation": encode_mask(dog)},
            # uncompressed RLE (column-major runs) of a category not in the vocabulary: not scored
            {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 1,
             "segmentation": {"size": [2, 4], "counts": [7, 1]}},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_coco_ground_truth(tmp_path):
    names = ["cat", "dog", "background"]
    out = _build(tmp_path, names, {0: [
        ("id-a", "maskclip", [[0, 1, 1, 2], [0, 0, 2, 2]]),
        ("id-a", "sam", [[0, 0, 1, -1], [0, 0, 2, 1]]),
    ]})
    gt = _coco(tmp_path / "instances.json")
    result = invoke(out, "--gt", gt)
    assert result.exit_code == 0, result.output
    data, rows = _results(out)
    assert data["gt_format"] == "coco" and data["background_scored"]
    assert data["images"] == [{"gt": "photos/a/img1.jpg", "path": "a/img1.jpg", "image_id": "id-a"}]
    assert any("person" in note for note in data["notes"]) and any("unknown.jpg" in note for note in data["notes"])
    # gt map: [[cat, dog, dog, bg], [cat, cat, bg, ignored]] (7 scored pixels)
    results = _by_key(data)
    maskclip, sam = results[(0, "maskclip")], results[(0, "sam")]
    assert maskclip["miou"] == pytest.approx(1.0) and maskclip["pixel_accuracy"] == pytest.approx(1.0)
    # sam: cat tp 3 fp 1 -> 3/4; dog tp 1 fn 1 -> 1/2; background tp 1, (0,3) unlabelled -> 1/2
    assert {c["class_name"]: c["iou"] for c in sam["per_class"]} == pytest.approx(
        {"cat": 3 / 4, "dog": 1 / 2, "background": 1 / 2})
    assert sam["miou"] == pytest.approx(7 / 12)
    assert sam["pixel_accuracy"] == pytest.approx(5 / 7)
    assert sam["total_pixels"] == 7 and sam["unlabelled_pixels"] == 1
    assert rows[(0, "sam", "cat")]["iou"] == pytest.approx(3 / 4)
    assert rows[(0, "sam", "background")]["gt_pixels"] == 2


def test_coco_without_background_class_ignores_unannotated(tmp_path):
    out = _build(tmp_path, ["dog", "cat"], {0: [("id-a", "maskclip", [[1, 1, 0, 0], [1, 0, 0, 0]])]})
    report = run_evaluate(EvaluateConfig(out=out, gt=_coco(tmp_path / "instances.json")))
    (r,) = report.results
    # scored: cat {(0,0),(1,0),(1,1)}, dog {(0,1),(0,2)}; dog: tp 1 fp 1 fn 1 -> 1/3; cat: tp 2 fp 1 fn 1 -> 2/4
    assert r.scores.iou.tolist() == pytest.approx([1 / 3, 2 / 4])
    assert r.scores.total_pixels == 5


def test_classes_absent_from_gt_are_nan_and_hidden(tmp_path):
    names = ["cat", "dog", "bird"]
    out = _build(tmp_path, names, {0: [("id-a", "maskclip", [[0, 2, 1, 1], [0, 0, 1, 1]])]})
    gt = tmp_path / "gt"
    _png(gt / "a" / "img1.png", GT_A)
    result = invoke(out, "--gt", gt)
    assert result.exit_code == 0, result.output
    data, rows = _results(out)
    (r,) = data["results"]
    ious = {c["class_name"]: c["iou"] for c in r["per_class"]}
    # cat: tp 2, fn (0,1) -> 2/3; dog: tp 3, fp... (1,3) is dog in gt -> 3/3; bird absent from gt -> null
    assert ious == {"cat": pytest.approx(2 / 3), "dog": pytest.approx(1.0), "bird": None}
    assert r["miou"] == pytest.approx((2 / 3 + 1) / 2)
    assert rows[(0, "maskclip", "bird")]["iou"] is None and rows[(0, "maskclip", "bird")]["pred_pixels"] == 1
    header = next(line for line in result.output.splitlines() if line.startswith("round"))
    assert "bird" not in header and "1 classes absent" in result.output


def test_stale_round_with_other_vocabulary_is_skipped(tmp_path, png_gt):
    out = _build(tmp_path, NAMES, {0: PNG_ROUNDS[0]})
    _write_round(out, 5, _rows("id-a", np.zeros((2, 4), int), ["bird"], "student", 5))
    report = run_evaluate(EvaluateConfig(out=out, gt=png_gt))
    assert {r.round for r in report.results} == {0}
    assert any("round 5" in note for note in report.notes)


# --------------------------------------------------------------------- errors: exit 2

def test_error_out_missing(tmp_path, png_gt):
    result = invoke(tmp_path / "nope", "--gt", png_gt)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_error_no_labels_yet(tmp_path, png_gt):
    out = tmp_path / "out"
    _manifest(out)
    result = invoke(out, "--gt", png_gt)
    assert result.exit_code == 2 and "no labels yet" in result.output


def test_error_gt_option_missing_or_absent(tmp_path):
    out = _build(tmp_path, NAMES, {0: PNG_ROUNDS[0]})
    result = invoke(out)
    assert result.exit_code == 2 and "--gt" in result.output
    result = invoke(out, "--gt", tmp_path / "nothing-here")
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "gt.txt").write_text("x")
    result = invoke(out, "--gt", tmp_path / "gt.txt")
    assert result.exit_code == 2 and "COCO" in result.output


def test_error_no_image_matched(tmp_path):
    out = _build(tmp_path, NAMES, {0: PNG_ROUNDS[0]})
    gt = tmp_path / "gt"
    _png(gt / "other.png", GT_B)
    result = invoke(out, "--gt", gt)
    assert result.exit_code == 2 and "matches an image" in result.output
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [],
                                "categories": [{"id": 1, "name": "cat"}]}))
    result = invoke(out, "--gt", coco)
    assert result.exit_code == 2 and "matches an image" in result.output


@pytest.mark.parametrize("text,message", [
    ("{not json", "cannot read COCO JSON"),
    ('{"images": []}', "needs lists"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}', "not valid COCO"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "horse"}]}', "matched by name"),
])
def test_error_bad_json(tmp_path, text, message):
    out = _build(tmp_path, NAMES, {0: PNG_ROUNDS[0]})
    path = tmp_path / "gt.json"
    path.write_text(text)
    result = invoke(out, "--gt", path)
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("values,mode,message", [
    ([[1, 1, 2, 0], [1, 9, 2, 2]], "L", "check --gt-offset"),  # class id 8 of a 2-class build
    (GT_A, "RGB", "mode RGB"),
    ([[1, 1], [2, 2]], "L", "label maps must have the image's size"),
])
def test_error_bad_png(tmp_path, values, mode, message):
    out = _build(tmp_path, NAMES, {0: PNG_ROUNDS[0]})
    gt = tmp_path / "gt"
    _png(gt / "a" / "img1.png", values, mode=mode)
    result = invoke(out, "--gt", gt)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_build_in_use_is_not_scored_exit_75(tmp_path, png_gt):
    from batchseg.io.lock import build_lock

    out = _build(tmp_path, NAMES, PNG_ROUNDS)
    with build_lock(out):
        result = invoke(out, "--gt", png_gt)
    assert result.exit_code == 75 and "another batchseg run is using" in result.output
    assert not (out / "eval").exists()


def _coco_with(path: Path, image: dict | None = None, ann: dict | None = None, extra_images=()) -> Path:
    """The COCO file of :func:`_coco` with the first image's and first annotation's fields replaced."""
    data = json.loads(_coco(path).read_text())
    data["images"][0].update(image or {})
    data["annotations"][0].update(ann or {})
    data["images"] += list(extra_images)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("image,ann,extra,message", [
    ({}, {"image_id": 42}, (), "annotations point at image ids its 'images' list does not have"),
    ({}, {}, ({"id": 1, "file_name": "b/img2.jpg"},), "more than once"),
    ({"height": -2}, {}, (), "height -2"),
    ({"width": 4.5}, {}, (), "width 4.5"),
    ({"height": "2"}, {}, (), "height '2'"),
    ({"height": 3}, {}, (), "is 4x3 pixels but a/img1.jpg is 4x2"),
    ({}, {"segmentation": [[0, 0, 2, 0, 2, "NaN", 0, 2]]}, (), "not a number"),
    ({}, {"segmentation": [[0, 0, 2, 0, 2, float("nan"), 0, 2]]}, (), "NaN or infinite"),
    ({}, {"segmentation": [[0, 0, 2, 0, 2, float("inf"), 0, 2]]}, (), "NaN or infinite"),
    ({}, {"segmentation": [[0, 0, 2, 0, 2, 1e300, 0, 2]]}, (), "far outside"),
    ({}, {"segmentation": [[0, 0, 2, 0, 2, 2, 0]]}, (), "flat list of x, y pairs"),
    ({}, {"segmentation": [[0, 0, 1, 1] * 50_001]}, (), "more than 100000 polygon points"),
    ({}, {"segmentation": {"size": [2, 4], "counts": [3, 99]}}, (), "covering 102 pixels"),
    ({}, {"segmentation": {"size": [2, 4], "counts": [-1, 9]}}, (), "non-negative"),
])
def test_bad_coco_ground_truth_is_refused_before_scoring(tmp_path, image, ann, extra, message):
    out = _build(tmp_path, NAMES, {0: PNG_ROUNDS[0]})
    gt = _coco_with(tmp_path / "gt.json", image, ann, extra)
    result = invoke(out, "--gt", gt)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (out / "eval").exists()


def test_ground_truth_that_matches_no_image_is_counted_and_printed(tmp_path, png_gt):
    out = _build(tmp_path, NAMES, PNG_ROUNDS)
    result = invoke(out, "--gt", png_gt)
    assert result.exit_code == 0, result.output
    assert "note: 1 PNG files match no image and were skipped: zzz/nothing.png" in result.output
    data, _ = _results(out)
    assert [item["path"] for item in data["images"]] == ["a/img1.jpg", "b/img2.jpg"]
