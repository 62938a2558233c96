"""Faults: a worker killed mid-shard, the whole command killed mid-run, a real external cluster."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchseg.config import ClusterSettings, EmbedConfig
from batchseg.io.tables import read_manifest, visible_parts
from batchseg.stages.embed import run_embed
from batchseg.testing import kill_once_builders, write_image_folder
from helpers import assert_same_build, embed_args, run_cli

SINGLE_THREAD = ["--workers", "1", "--threads", "1", "--batch-size", "1"]


def _config(src: Path, out: Path, tiny_models, fine_canvas: int = 0) -> EmbedConfig:
    return EmbedConfig(
        source=src, out=out, models=tiny_models.settings(canvas=64, precision="fp32", fine_canvas=fine_canvas),
        cluster=ClusterSettings(workers=1, torch_threads=1), batch_size=1, shard_size=3,
    )


@pytest.mark.parametrize("fine_canvas", [0, 128])
def test_worker_killed_during_a_shard_gives_the_same_outputs(image_folder, tmp_path, tiny_models, fine_canvas):
    marker = tmp_path / "killed"
    faulty = run_embed(_config(image_folder, tmp_path / "faulty", tiny_models, fine_canvas),
                       builders=kill_once_builders(marker, 2), progress=False)
    assert marker.exists(), "the fault was not injected"
    assert faulty.ok == 8 and faulty.failed == 0
    clean = run_embed(_config(image_folder, tmp_path / "clean", tiny_models, fine_canvas), progress=False)
    assert clean.ok == 8
    assert_same_build(tmp_path / "faulty", tmp_path / "clean")


def test_command_killed_mid_run_then_rerun_equals_a_clean_run(tmp_path, tiny_models):
    src = tmp_path / "src"
    write_image_folder(src, 12, seed=5)
    out = tmp_path / "out"
    script = (
        "from pathlib import Path\n"
        "from batchseg.config import ClusterSettings, EmbedConfig\n"
        "from batchseg.models.runtime import ModelBuilders\n"
        "from batchseg.stages.embed import run_embed\n"
        "from batchseg.testing import SlowClipBuilder, TinyModels\n"
        "if __name__ == '__main__':\n"
        f"    models = TinyModels(Path({str(tiny_models.clip_dir)!r}), Path({str(tiny_models.sam_checkpoint)!r}))\n"
        f"    config = EmbedConfig(Path({str(src)!r}), Path({str(out)!r}), models.settings(canvas=64, precision='fp32'),\n"
        "        ClusterSettings(workers=1, torch_threads=1), batch_size=1, shard_size=2)\n"
        "    run_embed(config, builders=ModelBuilders(clip=SlowClipBuilder(0.4)), progress=False)\n"
    )
    (tmp_path / "slow_embed.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "slow_embed.py")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not visible_parts(out / "manifest") and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(visible_parts(out / "manifest"))
    assert 1 <= committed < 6, committed
    assert sorted(p.name for p in out.iterdir() if "dask" in p.name) == []  # no scratch left inside OUT

    rerun = run_cli(embed_args(src, out, tiny_models, *SINGLE_THREAD, "--shard-size", "2"))
    assert rerun.exit_code == 0, rerun.output
    assert f"{12 - 2 * committed} computed" in rerun.output
    clean = run_cli(embed_args(src, tmp_path / "clean", tiny_models, *SINGLE_THREAD, "--shard-size", "2"))
    assert clean.exit_code == 0, clean.output
    paths = read_manifest(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 12
    assert_same_build(out, tmp_path / "clean")


def test_embed_on_an_external_dask_cluster(image_folder, tmp_path, tiny_models):
    dask = str(Path(sys.executable).parent / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    common = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], **common)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for index in range(2):
            procs.append(subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-dashboard",
                 "--local-directory", str(tmp_path / f"worker{index}"), "--name", f"w{index}"],
                env={**os.environ, "OMP_NUM_THREADS": "1"}, **common))
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            address = client.scheduler.address
        result = run_cli(embed_args(image_folder, tmp_path / "out", tiny_models, "--scheduler", address, "--shard-size", "2"))
        assert result.exit_code == 0, result.output
        assert "8 ok, 0 failed" in result.output
        shards = {row["shard"] for row in read_manifest(tmp_path / "out").to_pylist()}
        assert len(shards) == 4
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)


def test_file_rewritten_between_plan_and_decode_is_a_changed_row(image_folder, tmp_path, tiny_models):
    from batchseg.testing import rewrite_on_load_builders

    src = tmp_path / "src"
    write_image_folder(src, 3, seed=9)
    victim = sorted(src.rglob("*.png"))[0]
    other = sorted(src.rglob("*.jpg"))[0].read_bytes()
    summary = run_embed(_config(src, tmp_path / "out", tiny_models),
                        builders=rewrite_on_load_builders(victim, other), progress=False)
    rows = {r["path"]: r for r in read_manifest(tmp_path / "out").to_pylist()}
    row = rows[victim.relative_to(src).as_posix()]
    assert row["status"] == "changed" and "changed after it was hashed" in row["error"] and row["zarr_row"] is None
    assert summary.failed == 1 and summary.ok == 2
    again = run_embed(_config(src, tmp_path / "out", tiny_models), progress=False)
    # The victim now holds another file's bytes: the rerun records it as that file's duplicate.
    assert again.computed == 0 and again.duplicates == 1
