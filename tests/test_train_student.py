"""`batchseg train-student` end to end through the CLI on a tiny embedded and pseudo-labelled build."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from safetensors.torch import load_file

from batchseg.io.student_files import METRICS_SCHEMA
from batchseg.students.train import PAUSE_ENV, PAUSE_MARKER
from helpers import run_cli

TINY = ["--width", "16", "--depth", "1", "--input-size", "32", "--batch-size", "4", "--conf-thresh", "0",
        "--threads", "1", "-q"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def build(tmp_path, labelled_build) -> Path:
    target = tmp_path / "build"
    shutil.copytree(labelled_build, target)
    return target


def _train(out: Path, scheduler: str, *args: str):
    return run_cli(["train-student", str(out), "--scheduler", scheduler, *TINY, *args])


def test_trains_writes_its_files_and_a_rerun_does_nothing(build, dask_scheduler):
    result = _train(build, dask_scheduler, "--name", "s", "--epochs", "2", "--round", "0")
    assert result.exit_code == 0, result.output
    assert "8 images of round 0 (maskclip labels), 2 epochs" in result.output
    folder = build / "students" / "s"
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "semantic" and config["input_size"] == 32
    assert config["classes"][-1] == "background" and len(config["classes"]) == 13
    assert config["learnt_from"]["round"] == 0 and config["learnt_from"]["source"] == "maskclip"
    assert config["normalisation"]["mean"][0] == pytest.approx(0.4815, abs=1e-4)
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["text"].shape[0] == 13  # the frozen text classifier travels with the weights
    metrics = ds.dataset(folder / "metrics", format="parquet").to_table()
    assert metrics.schema.equals(METRICS_SCHEMA, check_metadata=False)
    assert sorted(metrics.column("epoch").to_pylist()) == [1, 2]
    assert all(v > 0 for v in metrics.column("targets_used").to_pylist())
    record = json.loads(next(p for p in (build / "runs").glob("*.json")
                              if json.loads(p.read_text())["command"] == "train-student").read_text())
    assert record["status"] == "finished"

    again = _train(build, dask_scheduler, "--name", "s", "--epochs", "2", "--round", "0")
    assert again.exit_code == 0 and "already trained" in again.output, again.output
    other = _train(build, dask_scheduler, "--name", "s", "--epochs", "3", "--round", "0")
    assert other.exit_code == 2 and "other settings (train differ)" in other.output

    last = _train(build, dask_scheduler, "--name", "last", "--epochs", "1", "--blocks", "dynamic")
    assert last.exit_code == 0, last.output
    assert "round 1 (student labels)" in last.output  # default: the last round


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--round", "7"], "round 7 does not exist"),
        (["--classes", "purple hexagon,red circle"], "do not have class(es) 'purple hexagon'"),
        (["--conf-thresh", "1.0"], "empty label set"),
        (["--source", "sam"], "has no 'sam' labels"),
        (["--name", "../x"], "--name must be a plain folder name"),
        (["--input-size", "30"], "multiple of 8"),
        (["--epochs", "0"], "--epochs"),
        (["--classes", "red circle,Red Circle"], "names a class twice"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(build, dask_scheduler, args, fragment):
    args = ["--name", "s", *args] if "--name" not in args else args
    result = run_cli(["train-student", str(build), "--scheduler", dask_scheduler, *TINY, *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_a_held_lock_exits_75(build, dask_scheduler):
    from batchseg.io.lock import build_lock

    with build_lock(build):
        result = _train(build, dask_scheduler, "--name", "s", "--epochs", "1")
    assert result.exit_code == 75 and "lock" in result.output


def test_a_build_without_labels_is_refused(tmp_path, dask_scheduler):
    result = run_cli(["train-student", str(tmp_path), "--name", "s", "--scheduler", dask_scheduler, "-q"])
    assert result.exit_code == 2 and "no pseudo labels" in result.output


def _command(out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "batchseg", "train-student", str(out), "--name", name, "--epochs", "3",
            "--workers", "1", *TINY]


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


def test_sigkill_mid_training_then_the_same_command_resumes_to_the_same_weights(build, dask_scheduler):
    reference = _train(build, dask_scheduler, "--name", "ref", "--epochs", "3")
    assert reference.exit_code == 0, reference.output

    folder = build / "students" / "killed"
    process = subprocess.Popen(_command(build, "killed"), env=_env(**{PAUSE_ENV: "1"}), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = folder / "_checkpoints" / PAUSE_MARKER
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert marker.exists(), process.stderr.read().decode() if process.poll() is not None else "timeout"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the command, its cluster and the training worker
        process.wait()
    assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()

    # The same command again (on the shared test cluster: where it runs does not change the weights).
    resumed = _train(build, dask_scheduler, "--name", "killed", "--epochs", "3")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed after epoch 1" in resumed.output
    a = load_file(str(build / "students" / "ref" / "model.safetensors"))
    b = load_file(str(folder / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    metrics = ds.dataset(folder / "metrics", format="parquet").to_table()
    assert sorted(metrics.column("epoch").to_pylist()) == [1, 2, 3]


def test_images_flagged_by_qc_are_not_learnt_from(build, monkeypatch):
    import batchseg.stages.train_student as stage
    from batchseg.stages.train_student import TrainStudentConfig, plan_training

    everything = plan_training(TrainStudentConfig(out=build, name="s"))
    victim = everything.images[0].image_id
    monkeypatch.setattr(stage, "flagged_image_ids", lambda out: frozenset({victim}))
    plan = plan_training(TrainStudentConfig(out=build, name="s"))
    assert plan.left_out == 1 and victim not in {image.image_id for image in plan.images}
    assert len(plan.images) == len(everything.images) - 1
    kept = plan_training(TrainStudentConfig(out=build, name="s", include_flagged=True))
    assert kept.left_out == 0 and len(kept.images) == len(everything.images)
