"""`batchseg pseudolabel` killed mid-round (SIGKILL of the whole process group) and rerun."""
import os
import shutil
import signal
import subprocess
import sys
import time

from batchseg.io.tables import read_labels, visible_parts
from helpers import run_cli
from test_pseudolabel import CLASSES, FAST, _embedded_template, build  # noqa: F401  (fixtures)


def _rows(out, round_index):
    rows = read_labels(out, round_index).to_pylist()
    return sorted(rows, key=lambda r: (r["image_id"], r["kind"], r["source"], r["segment_id"]))


def test_killed_pseudolabel_resumes_and_equals_a_clean_run(build, tmp_path, dask_scheduler):
    clean = tmp_path / "clean"
    shutil.copytree(build, clean)
    args = ["--classes", CLASSES, "--rounds", "1", "--shard-size", "1", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "batchseg", "pseudolabel", str(build), *args,
                             "--workers", "1", "--threads", "1"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = build / "labels" / "round=0"
    deadline = time.monotonic() + 180
    while (not folder.exists() or not visible_parts(folder)) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(visible_parts(folder))
    assert 1 <= committed < 8, committed

    rerun = run_cli(["pseudolabel", str(build), "--scheduler", dask_scheduler, *args])
    assert rerun.exit_code == 0, rerun.output
    assert f"round 0: {8 - committed} images" in rerun.output  # committed shards are kept
    reference = run_cli(["pseudolabel", str(clean), "--scheduler", dask_scheduler, *args])
    assert reference.exit_code == 0, reference.output
    for k in (0, 1):
        assert _rows(build, k) == _rows(clean, k)
