"""Cost of nightly `batchseg build` runs relative to the full build (target: <= 0.05).

Runs the real command line (``python -m batchseg build PIPELINE.yaml``, stdout not a
terminal, as under cron) three times on one output folder, with a pipeline of every
stage (embed, qc, pseudolabel with self-training, a semantic student, a COCO export,
the report):

1. **full**: the build of ``--images`` synthetic-world images;
2. **nothing new**: the same command again: the fixed cost of a no-op nightly run;
3. **+1% new**: ``--new-percent`` more images are added, the same command again.

Each run is reported as the wall time of the whole CLI process and split by stage from
the run record (``OUT/last-build.json``: each unit's seconds, a local cluster's start
counted in the first unit that needed it; "in the build": from taking the lock to the
record). "Outside" is the rest of the process: interpreter start and imports (torch, open_clip: most of it), reading the
pipeline file, the cluster's shutdown and the interpreter's exit. A rerun with new images
pays fixed costs that do not grow with the dataset (interpreter start and imports,
starting the local Dask cluster, loading the models in the fresh worker, training
nothing but labelling with kept heads, rewriting the report and the COCO JSON), so the
ratio falls as ``--images`` grows; the table shows where the seconds go.

    .venv/bin/python bench/build_incremental.py                       # 200 images, shipped toy models
    .venv/bin/python bench/build_incremental.py --images 8 --models tiny   # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as common

REPO = Path(__file__).resolve().parent.parent

PIPELINE = """\
sources: world/images
out: build
models:
  clip-model: local-dir:{clip}
  sam-model: tiny
  sam-checkpoint: {sam}
  precision: fp32
{canvas}
cluster:
  workers: {workers}
retrain: fraction
retrain-fraction: 0.1
embed:
  shard-size: {shard}
qc:
  features: dense-mean
  dup-features: dense-grid
pseudolabel:
  vocab: world/classes.txt
  background: true
  rounds: {rounds}
  points-per-side: {points}
  shard-size: {shard}
  epochs: 2
train-student:
  - name: semantic
    epochs: {student_epochs}
    width: 32
    depth: 2
    input-size: 64
export:
  - dest: coco
    format: coco
    images: none
report:
  per-class: 2
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images in the full build (default 200)")
    parser.add_argument("--new-percent", type=float, default=1.0,
                        help="images added before the rerun, in percent of --images (at least 1 image; default 1)")
    parser.add_argument("--models", choices=("toy", "tiny"), default="toy",
                        help="toy: the shipped toy CLIP (ConvNeXt) + toy SAM; tiny: random-init test models")
    parser.add_argument("--rounds", type=int, default=1, help="self-training rounds (default 1)")
    parser.add_argument("--points-per-side", type=int, default=8, help="SAM everything-mode grid (default 8)")
    parser.add_argument("--student-epochs", type=int, default=2, help="student epochs (default 2)")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard task (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="local cluster worker processes (default 1)")
    parser.add_argument("--target", type=float, default=0.05, help="largest acceptable rerun/full ratio (default 0.05)")
    parser.add_argument("--workdir", default=None, help="work here and keep it (default: a temporary folder)")
    return parser.parse_args(argv)


def models(kind: str, folder: Path) -> tuple[str, str, str]:
    """(clip folder, SAM checkpoint, canvas line) of the chosen models."""
    if kind == "toy":
        from batchseg.assets import TOY_CLIP_CNN_DIR, TOY_SAM_CHECKPOINT

        return str(TOY_CLIP_CNN_DIR), str(TOY_SAM_CHECKPOINT), ""
    from batchseg.testing import make_tiny_models

    tiny = make_tiny_models(folder / "models")
    return str(tiny.clip_dir), str(tiny.sam_checkpoint), "  canvas: 64"


def run_build(root: Path) -> tuple[float, dict]:
    """Wall seconds of one CLI build, and its run record."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "batchseg", "build", str(root / "pipeline.yaml")],
                            cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"batchseg build failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    print(result.stdout.rstrip(), flush=True)
    return wall, json.loads((root / "build" / "last-build.json").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    root, _ = common.workdir(args.workdir, "bench-build-")
    from batchseg.world import write_world

    print("\n".join(common.machine_lines()))
    clip, sam, canvas = models(args.models, root)
    (root / "pipeline.yaml").write_text(PIPELINE.format(
        clip=clip, sam=sam, canvas=canvas, workers=args.workers, shard=args.shard_size, rounds=args.rounds,
        points=args.points_per_side, student_epochs=args.student_epochs))
    write_world(root / "world", args.images, seed=7)
    new = max(1, math.ceil(args.images * args.new_percent / 100))
    print(f"workdir {root}; {args.images} images, then {new} new; models {args.models}", flush=True)

    runs = {}
    runs["full"] = run_build(root)
    runs["nothing new"] = run_build(root)
    write_world(root / "world", new, seed=7, start=args.images)
    runs[f"+{new} new ({args.new_percent:g}%)"] = run_build(root)

    keys = [u["key"].split(":")[0] for u in runs["full"][1]["stages"]]
    headers = ["run", "CLI wall s", "ratio to full", "in the build s", "ratio to full", "outside s"] + keys
    rows = []
    full_wall, full_build = runs["full"][0], runs["full"][1]["seconds"]
    for name, (wall, record) in runs.items():
        stages = [f"{u['seconds']:.1f}" + ("" if u["status"] == "ran" else f" ({u['status']})")
                  for u in record["stages"]]
        rows.append([name, f"{wall:.1f}", common.ratio(wall, full_wall), f"{record['seconds']:.1f}",
                     common.ratio(record["seconds"], full_build), f"{wall - record['seconds']:.1f}", *stages])
    print()
    print(common.table(headers, rows))
    rerun, record = list(runs.values())[2]
    for what, value, base in (("CLI process", rerun, full_wall), ("in the build", record["seconds"], full_build)):
        verdict = "met" if value / base <= args.target else "MISSED"
        print(f"rerun with new images / full, {what}: {value / base:.3f} (target <= {args.target}): {verdict}")
    print(f"no-op nightly run: {runs['nothing new'][0]:.1f} s in all")
    print(common.load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
