"""Layers stay one-way, and a rerun with nothing to do never imports torch (issue 8).

The drivers plan, check settings and find complete work from files alone; torch,
open_clip and segment-anything (seconds to import) come in only where work is done.
Each check runs in a fresh interpreter, since this test process has torch loaded.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import embed_args

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "segment_anything", "distributed")

# Runs the CLI like `batchseg ARGS`, then prints which heavy modules the process imported.
RUN_CLI = f"""
import sys
from batchseg.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="batchseg")
finally:
    print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _heavy(done: subprocess.CompletedProcess) -> list[str]:
    line = [line for line in done.stdout.splitlines() if line.startswith("HEAVY=")][-1]
    return [name for name in line[len("HEAVY="):].split(",") if name]


def test_cli_and_drivers_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import batchseg.cli, batchseg.stages.embed, batchseg.stages.pseudolabel, batchseg.stages.evaluate\n"
        "import batchseg.stages.export, batchseg.stages.report, batchseg.stages.qc\n"
        "import batchseg.config, batchseg.models.specs, batchseg.models.vocabulary, batchseg.labels.settings\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'open_clip' not in sys.modules, 'open_clip imported'\n"
        "assert 'segment_anything' not in sys.modules, 'segment_anything imported'\n"
        "print('ok')\n"
    )
    done = _python("-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_models_do_not_import_stage_configs() -> None:
    """models/ and labels/ take their settings as arguments, never the stage configs."""
    offenders = []
    for folder in ("models", "labels"):
        for path in sorted((ROOT / "batchseg" / folder).glob("*.py")):
            for line in path.read_text().splitlines():
                if line.lstrip().startswith(("from batchseg.config", "import batchseg.config", "from batchseg.stages")):
                    offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []


def test_noop_reruns_and_a_refusal_import_no_torch(tmp_path, labelled_build, tiny_models, dask_scheduler) -> None:
    out = tmp_path / "build"
    shutil.copytree(labelled_build, out)
    world = labelled_build.parent / "world"
    embed = embed_args(world / "images", out, tiny_models, "--no-sam", "--scheduler", dask_scheduler)

    done = _python("-c", RUN_CLI, *embed)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 computed" in done.stdout, done.stdout
    assert _heavy(done) == [], done.stdout

    precision = embed.index("--precision") + 1
    refused = _python("-c", RUN_CLI, *embed[:precision], "bf16", *embed[precision + 1:])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "different embedding settings" in refused.stderr
    assert _heavy(refused) == [], refused.stdout

    label = ["pseudolabel", str(out), "--vocab", str(world / "classes.txt"), "--background",
             "--rounds", "1", "--epochs", "1", "--scheduler", dask_scheduler, "-q"]
    done = _python("-c", RUN_CLI, *label)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("already complete, skipped") == 2, done.stdout
    assert _heavy(done) == [], done.stdout


def test_stages_leave_zarr_to_io() -> None:
    """Every Zarr array is opened in io/ (store, grid_store): no stage imports zarr itself."""
    import ast

    offenders = []
    for path in sorted((ROOT / "batchseg" / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "zarr"]
    assert offenders == []
