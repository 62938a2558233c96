"""Cost of an incremental `batchseg embed` rerun relative to the full build (target: <= 0.05).

DESIGN rule 4: "Cost of a rerun grows with new images, not with the dataset." This
script runs the real command line three times on one output folder:

1. **full**: ``batchseg embed SRC OUT`` on ``--images`` images;
2. **+1% new**: ``--new-percent`` more images are added to SRC, the same command again;
3. **nothing new**: the same command once more.

Each run is reported two ways, with its ratio to the full run:

* **CLI process**: wall time of the whole ``.venv/bin/batchseg embed ... -q``
  subprocess: interpreter start, imports (torch, open_clip, dask), everything below.
* **run_embed**: the ``seconds`` that ``run_embed`` itself measured and recorded in
  ``OUT/runs/RUN_ID.json`` (from taking the lock to the end of the run: discovery,
  planning/hashing, local cluster start, model load on the worker, compute, writes,
  cluster shutdown). Measuring it from the same runs saves doing the (long) full
  build twice; ``run_embed`` called from Python would cost the same, since it starts
  its own cluster and loads the models in fresh workers every time.

Why the ratio is not just new/total: a rerun pays fixed costs that do not depend on
the dataset: interpreter start and imports (seconds; the CUDA build of torch alone
is a large import), starting a local Dask cluster, and loading the models in the
fresh worker, plus its warm-up. With 1% new images (2 of 200) the rerun's compute is
tiny, so these fixed costs dominate it; they are measured separately below the
table so the two can be told apart. The full run amortises the same fixed costs over
all its images, so the ratio falls as --images grows; the target is meant for the
real models, where a full build of 200 images takes tens of minutes on a CPU.
"Nothing new" starts no cluster and loads no model (nothing is pending), so it shows
the cost of discovery, the manifest read and the planning alone, plus CLI start-up.

    .venv/bin/python bench/embed_incremental.py                                  # ViT-B-16 + SAM vit_b, 200 images
    .venv/bin/python bench/embed_incremental.py --clip tiny --sam tiny --images 8 # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _common as common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images in the full build (default 200)")
    parser.add_argument("--new-percent", type=float, default=1.0,
                        help="images added before the rerun, in percent of --images (at least 1 image; default 1)")
    parser.add_argument("--image-size", type=common.parse_image_size, default=(640, 480),
                        help="WIDTHxHEIGHT of the generated JPEGs, or 'small' (default 640x480)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard task (default 64, the CLI's)")
    parser.add_argument("--workers", type=int, default=1, help="local cluster worker processes (default 1)")
    parser.add_argument("--target", type=float, default=0.05, help="largest acceptable rerun/full ratio (default 0.05)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip measuring the fixed costs separately")
    parser.add_argument("--workdir", default=None, help="keep images and outputs here (default: a temp folder, deleted)")
    common.add_model_options(parser, clip="ViT-B-16", sam="vit_b")
    args = parser.parse_args(argv)
    if args.images < 1 or args.new_percent <= 0:
        parser.error("--images must be at least 1 and --new-percent above 0")
    return args


def batchseg_command() -> list[str]:
    script = common.VENV_BIN / "batchseg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchseg"]


def run_cli(args: argparse.Namespace, choice: common.ModelChoice, source: Path, out: Path) -> dict:
    """Run ``batchseg embed`` once; wall seconds of the process and run_embed's own record."""
    command = batchseg_command() + [
        "embed", str(source), str(out), *choice.cli_args(),
        "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
        "--workers", str(args.workers), "-q",
    ]
    with common.Timer() as timer:
        proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"batchseg embed failed with exit code {proc.returncode}: {' '.join(command)}")
    match = re.search(r"runs/([^\s/]+)\.json", proc.stdout)
    if match is None:
        raise SystemExit(f"no run id in the output of batchseg embed:\n{proc.stdout}")
    record = json.loads((out / "runs" / f"{match[1]}.json").read_text())
    counts = record["counts"]
    return {"process_s": timer.seconds, "run_embed_s": counts["seconds"], "computed": counts["computed"],
            "skipped": counts["skipped"], "ok": counts["ok"], "command": command}


def fixed_costs(choice: common.ModelChoice, workers: int, scratch: Path) -> list[tuple[str, str]]:
    """Seconds of the costs every computing run pays whatever its size."""
    from batchseg.cluster import dask_client
    from batchseg.config import ClusterSettings
    from batchseg.models.runtime import ModelBuilders
    from batchseg.stages.embed import probe_geometry

    rows = []
    with common.Timer() as imports:
        subprocess.run([sys.executable, "-c", "import batchseg.cli, batchseg.stages.embed"], check=True)
    rows.append(("interpreter start + imports (import batchseg.cli, batchseg.stages.embed)", f"{imports.seconds:.2f}"))
    with common.Timer() as help_:
        subprocess.run(batchseg_command() + ["embed", "--help"], check=True, capture_output=True)
    rows.append(("`batchseg embed --help` (CLI start without the stage imports)", f"{help_.seconds:.2f}"))
    settings = choice.settings()
    with common.Timer() as total:
        with dask_client(ClusterSettings(workers=workers), scratch) as client:
            started = total.start
            import time

            cluster_up = time.perf_counter() - started
            with common.Timer() as first:
                client.submit(probe_geometry, settings, ModelBuilders(), pure=False).result()
            stopping = time.perf_counter()
        cluster_down = time.perf_counter() - stopping
    rows.append((f"local cluster start ({workers} worker process(es))", f"{cluster_up:.2f}"))
    rows.append(("first task on a fresh worker: worker imports + model load (probe_geometry)", f"{first.seconds:.2f}"))
    rows.append(("local cluster shutdown", f"{cluster_down:.2f}"))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    folder, created = common.workdir(args.workdir, "bench-incremental-")
    try:
        choice = common.model_choice(args, folder)
        source, out = folder / "images", folder / "out"
        for path in (source, out):
            shutil.rmtree(path, ignore_errors=True)
        n = args.images
        new = max(1, math.ceil(n * args.new_percent / 100 - 1e-9))
        common.write_images(source, n, args.image_size)
        print("\n".join(common.machine_lines()))
        size = "small (40-120 px)" if args.image_size is None else f"{args.image_size[0]}x{args.image_size[1]} JPEG"
        print(f"images: {n} + {new} new, {size}; batch {args.batch_size}, shard {args.shard_size}, "
              f"{args.workers} worker(s); models: clip {args.clip}, sam {args.sam}, {args.precision}", flush=True)

        print(f"full run ({n} images) ...", flush=True)
        full = run_cli(args, choice, source, out)
        print(f"  {full['process_s']:.1f} s", flush=True)
        print(f"  $ {' '.join(full['command'])}")
        common.write_images(source, new, args.image_size, start=n)
        print(f"rerun with {new} new image(s) ...", flush=True)
        plus = run_cli(args, choice, source, out)
        print(f"  {plus['process_s']:.1f} s", flush=True)
        print("rerun with nothing new ...", flush=True)
        none = run_cli(args, choice, source, out)
        print(f"  {none['process_s']:.1f} s", flush=True)
        for label, got, expected in (("full", full, n), ("+new", plus, new), ("nothing new", none, 0)):
            if got["computed"] != expected:
                raise SystemExit(f"{label} run computed {got['computed']} images, expected {expected}: {got}")

        def verdict(value: float, base: float, gated: bool) -> str:
            if not gated:
                return ""
            return "ok" if value / base <= args.target else "OVER"

        rows = []
        for label, got, gated in (
            (f"full ({n} images)", full, False),
            (f"rerun, {new} new ({100 * new / n:.1f}%)", plus, True),
            ("rerun, nothing new", none, True),
        ):
            rows.append((
                label, got["computed"],
                f"{got['process_s']:.2f}", common.ratio(got["process_s"], full["process_s"]),
                verdict(got["process_s"], full["process_s"], gated),
                f"{got['run_embed_s']:.2f}", common.ratio(got["run_embed_s"], full["run_embed_s"]),
                verdict(got["run_embed_s"], full["run_embed_s"], gated),
            ))
        headers = ("run", "computed", "CLI process s", "ratio", f"<= {args.target}",
                   "run_embed s", "ratio", f"<= {args.target}")
        print()
        print(common.table(headers, rows))
        print(f"\nproportional ideal for the +new rerun: {new}/{n} = {new / n:.3f}; "
              f"full run: {n / full['run_embed_s']:.3f} images/s inside run_embed")
        if not args.no_breakdown:
            print("measuring fixed costs ...", flush=True)
            print()
            print(common.table(("fixed cost (paid by every run that computes anything)", "seconds"),
                               fixed_costs(choice, args.workers, folder)))
        print(common.load_line())
        return 0
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
