"""`batchseg build PIPELINE.yaml` end to end through the CLI on a small synthetic world.

Tiny random-init models, 6 images (+2 added later), every stage: embed, qc,
pseudolabel (rounds 0 and 1), evaluate, a student, a COCO export and the report.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from batchseg.io.lock import build_lock
from batchseg.io.qc_table import read_qc
from batchseg.io.tables import read_labels, read_manifest, round_folder, visible_parts
from batchseg.world import write_world
from helpers import manifest_rows, run_build as build, write_build_root as write_root

UNITS = ("embed", "qc", "pseudolabel", "evaluate", "train-student:s", "export:", "report")


def last_record(out: Path) -> dict:
    record = json.loads((out / "last-build.json").read_text())
    assert record == json.loads((out / "runs" / f"{record['run_id']}.json").read_text())
    return record


def _rows(out: Path, k: int) -> list[dict]:
    rows = read_labels(out, k).to_pylist()
    return sorted(rows, key=lambda r: (r["image_id"], r["kind"], r["source"], r["segment_id"]))


def test_a_pipeline_builds_every_stage_and_records_the_run(clean_root):
    out = clean_root / "build"
    record = last_record(out)
    assert record["status"] == "finished" and record["command"] == "build"
    by_key = {u["key"]: u for u in record["stages"]}
    assert [u["key"].split(":")[0] for u in record["stages"]] == [
        "embed", "qc", "pseudolabel", "evaluate", "train-student", "export", "report"]
    assert all(u["status"] == "ran" and u["seconds"] >= 0 for u in record["stages"]), record["stages"]
    assert by_key["embed"]["computed"] == 6 and by_key["embed"]["counts"]["ok"] == 6
    assert by_key["qc"]["counts"]["flagged"] == 0
    assert [r["images"] for r in by_key["pseudolabel"]["counts"]["rounds"]] == [6, 6]
    ids = {r["image_id"] for r in read_manifest(out).to_pylist()}
    for k in (0, 1):
        assert {r["image_id"] for r in read_labels(out, k).to_pylist()} == ids
    assert (out / "students" / "s" / "config.json").exists()
    coco = json.loads((clean_root / "coco" / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 6 and coco["annotations"]
    assert (out / "report" / "index.html").exists() and len(list((out / "eval").glob("*.json"))) == 1
    # Not a terminal: no progress bars, one summary line per unit, then the build's.
    lines = (clean_root / "stdout.txt").read_text().splitlines()
    assert len(lines) == 8 and lines[-1].startswith("build finished: 7 units, 7 computed something")
    assert [line.split(":")[0] for line in lines[:7]] == [
        "embed", "qc", "pseudolabel", "evaluate", "train-student", "export", "report"]
    log = (out / record["log"]).read_text()
    for key in UNITS:  # one summary line per unit in the log, as on stdout
        assert f" {key}" in log
    # Each stage also wrote its own run record, as when run by hand.
    commands = {json.loads(p.read_text()).get("command") for p in (out / "runs").glob("*.json")}
    assert {"embed", "qc", "pseudolabel", "train-student", "export", "report", "build"} <= commands


def test_rerun_with_nothing_new_computes_nothing_then_new_images_are_all_that_is_computed(
        clean_root, tmp_path, dask_scheduler):
    root = tmp_path / "root"
    shutil.copytree(clean_root, root, symlinks=True)
    pipeline, out = root / "p.yaml", root / "build"
    settle = build(pipeline, dask_scheduler)  # the copy's paths differ: evaluate and export look again
    assert settle.exit_code == 0, settle.output

    started = time.perf_counter()
    again = build(pipeline, dask_scheduler)
    wall = time.perf_counter() - started
    assert again.exit_code == 0, again.output
    record = last_record(out)
    assert [u["status"] for u in record["stages"]] == ["up to date"] * 7, record["stages"]
    assert sum(u["computed"] for u in record["stages"]) == 0
    assert wall < 10, wall  # file listings only: no cluster, no model
    for key in UNITS:
        assert f"{key}" in again.output and "up to date" in again.output
    assert again.output.count("\n") == 8  # one line per unit and the summary: nothing else on stdout

    parts_before = {k: {p.name for p in visible_parts(round_folder(out, k))} for k in (0, 1)}
    rows_before = {k: _rows(out, k) for k in (0, 1)}
    write_world(root / "world", 2, seed=11, start=6, max_side=80)
    dry = build(pipeline, dask_scheduler, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "embed: 2 new images to embed" in dry.output and "round 0: label 2 new images" in dry.output
    assert "round 1: the kept head labels the 2 new images" in dry.output
    assert last_record(out)["run_id"] == record["run_id"]  # a dry run writes nothing

    grown = build(pipeline, dask_scheduler)
    assert grown.exit_code == 0, grown.output
    by_key = {u["key"].split(":")[0]: u for u in last_record(out)["stages"]}
    assert by_key["embed"]["computed"] == 2 and by_key["embed"]["counts"]["skipped"] == 6
    assert by_key["qc"]["counts"]["new_files"] == 2
    # Round 0 labels the new images; round 1 keeps its head (2 added to 6 < retrain-fraction 0.5).
    assert [r["images"] for r in by_key["pseudolabel"]["counts"]["rounds"]] == [2, 2]
    assert by_key["train-student"]["status"] == "kept"
    assert by_key["export"]["counts"]["parts_written"] >= 1
    new_ids = {r["image_id"] for r in read_manifest(out).to_pylist()} - {r["image_id"] for r in rows_before[0]}
    assert len(new_ids) == 2
    for k in (0, 1):
        assert parts_before[k] < {p.name for p in visible_parts(round_folder(out, k))}  # old parts kept
        assert [r for r in _rows(out, k) if r["image_id"] not in new_ids] == rows_before[k]
        assert {r["image_id"] for r in _rows(out, k)} - {r["image_id"] for r in rows_before[k]} == new_ids
    info = json.loads((out / "selftrain" / "round=1" / "_round.json").read_text())
    assert info["trained_images"] == 6 and info["images"] == 8


def test_a_settings_change_recomputes_what_it_affects(clean_root, tmp_path, dask_scheduler):
    root = tmp_path / "root"
    shutil.copytree(clean_root, root, symlinks=True)
    out = root / "build"
    rows0 = _rows(out, 0)
    changed = build(root / "p.yaml", dask_scheduler, "--set", "pseudolabel.epochs=2", "--set", "qc.dup-threshold=0.99")
    assert changed.exit_code == 0, changed.output
    by_key = {u["key"].split(":")[0]: u for u in last_record(out)["stages"]}
    assert by_key["embed"]["status"] == "up to date"
    assert by_key["qc"]["counts"]["refit"] is True and by_key["qc"]["counts"]["new_files"] == 6
    # A self-training setting: round 0 is kept, round 1 recomputed, the student learns again.
    assert [(r["round"], r["skipped"], r["images"]) for r in by_key["pseudolabel"]["counts"]["rounds"]] == [
        (0, True, 0), (1, False, 6)]
    assert _rows(out, 0) == rows0
    assert by_key["train-student"]["status"] == "ran"
    assert "labels were recomputed" in by_key["train-student"]["counts"]["reason"]
    assert by_key["export"]["counts"]["parts_written"] >= 1


def test_a_second_build_on_the_same_output_exits_75_at_once(clean_root, tmp_path):
    out = clean_root / "build"
    with build_lock(out):
        started = time.perf_counter()
        result = build(clean_root / "p.yaml", None)
        assert result.exit_code == 75, result.output
        assert time.perf_counter() - started < 15
    assert "another batchseg run is using" in result.output


def test_only_and_from_choose_the_stages(clean_root, tmp_path, dask_scheduler):
    root = tmp_path / "root"
    shutil.copytree(clean_root, root, symlinks=True)
    only = build(root / "p.yaml", dask_scheduler, "--only", "report")
    assert only.exit_code == 0, only.output
    assert [u["key"] for u in last_record(root / "build")["stages"]] == ["report"]
    bad = build(root / "p.yaml", dask_scheduler, "--from", "predict")
    assert bad.exit_code == 2 and "unknown stage" in bad.output


def test_a_failing_stage_exits_1_and_is_recorded_with_its_traceback_in_the_log(clean_root, tmp_path, monkeypatch):
    import batchseg.stages.report as report

    root = tmp_path / "root"
    shutil.copytree(clean_root, root, symlinks=True)

    def broken(config, progress=True):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "run_report", broken)
    result = build(root / "p.yaml", None, "--only", "report", "--set", "report.per-class=2")  # not up to date
    assert result.exit_code == 1, result.output
    assert "build failed in a stage: RuntimeError: disk on fire" in result.output
    record = last_record(root / "build")
    assert record["status"] == "failed" and "disk on fire" in record["error"]
    assert [(u["key"], u["status"]) for u in record["stages"]] == [("report", "failed")]
    log = (root / "build" / record["log"]).read_text()
    assert "Traceback" in log and "disk on fire" in log


def test_killed_build_reruns_to_the_same_outputs_as_a_clean_build(clean_root, tiny_models, tmp_path, dask_scheduler):
    root = tmp_path / "root"
    pipeline = write_root(root, tiny_models)
    out = root / "build"
    proc = subprocess.Popen([sys.executable, "-m", "batchseg", "build", str(pipeline)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    marker = out / "students" / "s" / "_checkpoints"  # inside train-student, after pseudolabel
    deadline = time.monotonic() + 420
    while not marker.exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.02)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "students" / "s" / "config.json").exists()
    # One local cluster for every stage of the killed run: started once, and the stages' records name it.
    (killed_log,) = (out / "runs").glob("*.log")
    started = [line for line in killed_log.read_text().splitlines() if "dask: started a local cluster" in line]
    assert len(started) == 1, started
    address = started[0].split("cluster ")[1].split(" ")[0]
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    used = {r["command"]: r["config"]["cluster"]["scheduler"] for r in records if r.get("command") in ("embed",
                                                                                                      "train-student")}
    assert used.get("embed") == address, (used, address)

    rerun = build(pipeline, dask_scheduler)
    assert rerun.exit_code == 0, rerun.output
    by_key = {u["key"]: u for u in last_record(out)["stages"]}
    assert by_key["embed"]["status"] == "up to date"
    assert by_key["train-student:s"]["status"] == "ran"

    clean = clean_root / "build"
    assert manifest_rows(out) == manifest_rows(clean)
    for k in (0, 1):
        assert _rows(out, k) == _rows(clean, k)
    drop = ("run_id", "model_id")
    assert sorted(({k: v for k, v in r.items() if k not in drop} for r in read_qc(out).to_pylist()),
                  key=lambda r: r["path"]) == sorted(({k: v for k, v in r.items() if k not in drop}
                                                      for r in read_qc(clean).to_pylist()), key=lambda r: r["path"])
    weights, reference = (load_file(str(o / "students" / "s" / "model.safetensors")) for o in (out, clean))
    assert weights.keys() == reference.keys()
    for name in weights:
        assert (weights[name] == reference[name]).all(), name
    coco, coco_clean = (json.loads((r / "coco" / "annotations" / "instances_train.json").read_text())
                        for r in (root, clean_root))
    assert coco["annotations"] == coco_clean["annotations"] and coco["images"] == coco_clean["images"]
    assert (out / "report" / "index.html").exists()
