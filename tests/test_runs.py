"""Run records: every command writes ``OUT/runs/RUN_ID.json`` the same way, failed runs included."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import run_cli
from batchseg.cli import cli
from batchseg.io.runs import RunStatus, recorded_run, run_record_path
from batchseg.testing_labels import write_labelled_build

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"run_id", "command", "argv", "status", "error", "error_kind", "config", "versions", "host",
          "started_at", "finished_at", "seconds", "counts"}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_run_is_recorded_running_then_finished_with_its_counts(tmp_path):
    with recorded_run(tmp_path, "demo", {"out": tmp_path, "size": 3}) as run:
        during = _read(run_record_path(tmp_path, run.run_id))
        run.add_counts(images=4)
        run.add_counts({"rows": 9})
        run.set(model={"dim": 2})
    after = _read(run.path)
    assert during["status"] == "running" and during["finished_at"] is None and during["counts"] == {}
    assert set(after) == SHARED | {"model"}
    assert after["status"] == "finished" and after["error"] is None and after["error_kind"] is None
    assert after["command"] == "demo" and after["run_id"] == run.run_id == during["run_id"]
    assert after["config"] == {"out": str(tmp_path), "size": 3}
    assert after["counts"] == {"images": 4, "rows": 9} and after["model"] == {"dim": 2}
    assert after["versions"]["batchseg"] and after["versions"]["python"]
    assert after["seconds"] >= 0 and after["finished_at"] >= after["started_at"] == during["started_at"]


def test_a_failed_run_is_recorded_with_its_error_and_the_error_is_raised_again(tmp_path):
    with pytest.raises(ValueError, match="disk on fire"):
        with recorded_run(tmp_path, "demo", {}) as run:
            run.add_counts(images=2)  # what was done before the failure is kept
            raise ValueError("disk on fire")
    record = _read(run.path)
    assert record["status"] == "failed" and record["error_kind"] == "ValueError"
    assert record["error"] == "ValueError: disk on fire" and record["counts"] == {"images": 2}
    assert record["finished_at"] is not None and record["seconds"] >= 0


def test_an_interrupted_run_says_so(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with recorded_run(tmp_path, "demo", {}) as run:
            raise KeyboardInterrupt
    assert _read(run.path)["status"] == RunStatus.INTERRUPTED == "interrupted"


def test_shared_fields_belong_to_the_recorder_and_a_missing_folder_is_not_created(tmp_path):
    with recorded_run(tmp_path, "demo", {}) as run:
        with pytest.raises(ValueError, match="status"):
            run.set(status="finished")
    gone = tmp_path / "gone"
    with recorded_run(gone, "export", {}):
        pass
    assert not gone.exists()


def test_the_recorder_imports_neither_torch_nor_zarr():
    code = "import sys, batchseg.io.runs; print(sorted(m for m in ('torch', 'zarr') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def _evaluate_args(tmp_path: Path, request) -> tuple[Path, list[str]]:
    build = write_labelled_build(tmp_path / "b", 3, seed=5, rounds=0, evaluation=False)
    return build.out, ["evaluate", str(build.out), "--gt", str(build.world / "gt")]


def _pseudolabel_args(tmp_path: Path, request) -> tuple[Path, list[str]]:
    labelled = request.getfixturevalue("labelled_build")
    out = tmp_path / "build"
    shutil.copytree(labelled, out)
    world = labelled.parent / "world"
    return out, ["pseudolabel", str(out), "--vocab", str(world / "classes.txt"), "--background", "--rounds", "1",
                 "--epochs", "1", "--scheduler", request.getfixturevalue("dask_scheduler"), "-q"]


def _new_records(out: Path, before: set[Path]) -> list[dict]:
    return [_read(path) for path in sorted(set((out / "runs").glob("*.json")) - before)]


@pytest.mark.parametrize("command, arguments", [("evaluate", _evaluate_args), ("pseudolabel", _pseudolabel_args)])
def test_each_command_records_its_run(command, arguments, tmp_path, request):
    out, args = arguments(tmp_path, request)
    before = set((out / "runs").glob("*.json"))
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    (record,) = _new_records(out, before)
    assert set(record) >= SHARED
    assert record["command"] == command and record["status"] == "finished" and record["error"] is None
    assert Path(record["config"]["out"]) == out
    assert record["counts"] and record["seconds"] >= 0 and record["finished_at"] >= record["started_at"]
    if command == "pseudolabel":  # a rerun with nothing to do: both rounds recorded as skipped
        assert [(r["round"], r["skipped"]) for r in record["counts"]["rounds"]] == [(0, True), (1, True)]
    else:
        assert record["counts"]["images_matched"] == 3 and record["counts"]["eval_id"]


def test_a_failing_pseudolabel_run_leaves_a_failed_record(tmp_path, request, monkeypatch):
    import batchseg.stages.pseudolabel as pseudolabel

    out, args = _pseudolabel_args(tmp_path, request)
    plan_round = pseudolabel._plan_round

    def failing(config, round_index, *rest):
        if round_index == 1:
            raise RuntimeError("disk on fire")
        return plan_round(config, round_index, *rest)

    monkeypatch.setattr(pseudolabel, "_plan_round", failing)
    before = set((out / "runs").glob("*.json"))
    result = CliRunner().invoke(cli, args)  # an unexpected error: not mapped to a message, still recorded
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError), result.output
    (record,) = _new_records(out, before)
    assert record["command"] == "pseudolabel" and record["status"] == "failed"
    assert record["error_kind"] == "RuntimeError" and record["error"] == "RuntimeError: disk on fire"
    assert [r["round"] for r in record["counts"]["rounds"]] == [0]  # round 0 finished before round 1 failed
