"""The YOLACT instance student: matching, loss, detection, and `train-student --kind instance` + `predict`."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from batchseg.io.tables import read_labels, read_manifest
from batchseg.labels.rle import decode_mask
from batchseg.students.load import LoadedStudent
from batchseg.students.predict import instance_label_rows
from batchseg.students.instance_data import masks_to_boxes
from batchseg.students.yolact import Yolact, YolactArch, decode, detect, encode, make_anchors
from batchseg.students.yolact_loss import match, yolact_loss
from helpers import ground_truth_instance_rows, run_cli


def test_box_encoding_round_trips_and_boxes_come_from_masks():
    anchors = make_anchors(YolactArch(input_size=64))
    assert anchors.shape == (3 * (8 * 8 + 4 * 4 + 2 * 2), 4)
    boxes = torch.tensor([[3.0, 4.0, 20.0, 30.0]]).expand(len(anchors), 4)
    torch.testing.assert_close(decode(encode(boxes, anchors), anchors), boxes, atol=1e-3, rtol=1e-4)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 10, 0] = True
    assert masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 10, 1, 11]]


def test_matching_forces_each_object_a_positive_and_finds_the_second_best():
    anchors = torch.tensor([[10.0, 10, 20, 20], [30, 30, 20, 20], [20, 10, 20, 20]])  # cxcywh
    boxes = torch.tensor([[0.0, 0, 20, 20], [12, 0, 32, 20]])  # object 1 overlaps object 0
    state, best, second, second_iou = match(anchors, boxes)
    assert state.tolist() == [1, 0, 1] and best.tolist()[0] == 0 and best.tolist()[2] == 1
    assert second.tolist()[0] == 1 and second_iou[0] == pytest.approx(8 * 20 / (2 * 400 - 160))


def test_loss_decreases_when_fitting_one_image():
    torch.manual_seed(0)
    model = Yolact(YolactArch(width=16, depth=1, input_size=64, prototypes=8), ("a", "b"))
    pixels = torch.randn(1, 3, 64, 64)
    masks = torch.zeros(1, 2, 64, 64, dtype=torch.bool)
    masks[0, 0, 8:30, 8:28] = True
    masks[0, 1, 30:60, 20:50] = True
    classes = [torch.tensor([0, 1])]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, count = yolact_loss(model, model(pixels), list(masks), classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert count == 2 and losses[-1] < 0.3 * losses[0]
    with torch.no_grad():
        found = detect(model.eval(), model(pixels), 0, nms="fast", score_thresh=0.3)
    assert sorted(found.class_ids.tolist()) == [0, 1]  # both objects, each once, after Fast NMS
    ious = [float((found.masks[i] & masks[0, c]).sum() / (found.masks[i] | masks[0, c]).sum())
            for i, c in enumerate(found.class_ids.tolist())]
    assert min(ious) > 0.5

    # The same detections as label rows in original pixels (a 128x96 image letterboxed to 64x48).
    student = LoadedStudent(model, {"kind": "instance", "classes": ["a", "b"], "input_size": 64,
                                    "inference": {"nms": "noh", "nms_thresh": 0.5}}, "cpu")
    with torch.no_grad():
        rows = instance_label_rows(student, model(pixels), 0, "img", 96, 128, (48, 64))
    assert sorted(r["class_name"] for r in rows) == ["a", "b"]
    for row in rows:
        mask = decode_mask(row["mask"])
        assert mask.shape == (96, 128)
        assert row["kind"] == "instance" and row["source"] == "student" and row["area"] == int(mask.sum()) > 0


def test_train_instance_student_and_predict_instances(labelled_build, tmp_path, dask_scheduler):
    nms = "noh"
    out = tmp_path / "build"
    shutil.copytree(labelled_build, out)
    no_instances = run_cli(["train-student", str(out), "--kind", "instance", "--name", "y", "--round", "0",
                            "--scheduler", dask_scheduler, "-q"])
    assert no_instances.exit_code == 2 and "empty label set" in no_instances.output
    ground_truth_instance_rows(out, labelled_build.parent / "world")
    result = run_cli(["train-student", str(out), "--kind", "instance", "--name", "y", "--round", "0", "--epochs", "2",
                      "--width", "16", "--depth", "1", "--input-size", "64", "--batch-size", "4", "--nms", nms,
                      "--threads", "1", "--scheduler", dask_scheduler, "-q"])
    assert result.exit_code == 0, result.output
    assert "(sam labels)" in result.output
    config = json.loads((out / "students" / "y" / "config.json").read_text())
    assert config["kind"] == "instance" and config["inference"]["nms"] == "noh"
    assert len(config["classes"]) == 12  # the object classes; YOLACT has its own background
    dest = tmp_path / "predicted"
    predicted = run_cli(["predict", str(out / "students" / "y"), str(labelled_build.parent / "world" / "images"),
                         str(dest), "--scheduler", dask_scheduler, "--threads", "1", "-q"])
    assert predicted.exit_code == 0, predicted.output
    assert [r["status"] for r in read_manifest(dest).to_pylist()] == ["ok"] * 8
    table = read_labels(dest, 0)
    assert set(table.column("kind").to_pylist()) <= {"instance"}
    assert set(table.column("source").to_pylist()) <= {"student"}
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in read_manifest(dest).to_pylist()}
    for row in table.to_pylist():
        assert tuple(row["mask"]["size"]) == sizes[row["image_id"]]
