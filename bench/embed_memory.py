"""Peak memory of `batchseg embed` at a small and a large image count (target: large/small <= 1.2).

Memory of the driver and of a worker should not grow with the dataset: images stream
through shards, and the driver holds only the plan and the manifest. Each size runs
in a fresh subprocess (``--child``) that:

1. starts the same local cluster ``run_embed`` would start for ``--workers N``
   (``batchseg.cluster._cpu_cluster``: N worker processes, scheduler in the driver
   process, as with the CLI), and passes it to ``run_embed`` as
   ``ClusterSettings(scheduler=ADDRESS)``;
2. runs ``run_embed`` into a fresh OUT;
3. reads the driver's peak RSS (the driver process also hosts the Dask scheduler, as
   in the CLI) and each worker's, by running a function on every worker at the end
   that returns its own peak.

Peak RSS is Linux's ``VmHWM`` (``/proc/self/status``), not ``ru_maxrss``: Linux keeps
``ru_maxrss`` across fork/exec, so a spawned worker or subprocess would report at
least its parent's peak (about 1 GiB here: importing the CUDA build of torch alone is
~650 MiB RSS) and the ratio would say nothing. Other systems fall back to ``ru_maxrss``.

Worker processes are spawned fresh for each size, so their peaks belong to that run.
Also shown: the driver's RSS right after its imports (torch, open_clip, dask: a fixed
cost that dominates small runs), and the growth per 1000 images extrapolated from the
two sizes. The pipeline's memory does not depend on model weights beyond a constant,
so tiny models are the default; ``--sam vit_b`` shows the worker's real-size peak
(SAM inputs are 1024x1024x3 float32 = 12 MiB per image in the prefetch queue).

    .venv/bin/python bench/embed_memory.py                       # 50 vs 500 images, tiny models, 640x480 JPEGs
    .venv/bin/python bench/embed_memory.py --small 4 --large 16  # smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import _common as common

RESULT_PREFIX = "BENCH-RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=50, help="images in the small run (default 50)")
    parser.add_argument("--large", type=int, default=500, help="images in the large run (default 500)")
    parser.add_argument("--image-size", type=common.parse_image_size, default=(640, 480),
                        help="WIDTHxHEIGHT of the generated JPEGs, or 'small' (default 640x480)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard task (default 64, the CLI's)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--target", type=float, default=1.2, help="largest acceptable large/small ratio (default 1.2)")
    parser.add_argument("--workdir", default=None, help="keep images and outputs here (default: a temp folder, deleted)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    common.add_model_options(parser, clip="tiny", sam="tiny")
    args = parser.parse_args(argv)
    if args.child is None and not (1 <= args.small < args.large):
        parser.error("need 1 <= --small < --large")
    return args


# --------------------------------------------------------------------------- child process


def _worker_memory() -> dict:
    """Runs on each worker (pickled by value): its own peak and current RSS, in bytes."""
    import psutil

    peak = None
    try:
        with open("/proc/self/status") as status:  # VmHWM: see _common.peak_rss_bytes
            for line in status:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    if peak is None:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = int(peak) if sys.platform == "darwin" else int(peak) * 1024
    return {"peak": peak, "rss": int(psutil.Process().memory_info().rss)}


def child(spec: dict) -> int:
    start_rss = common.current_rss_bytes()
    import os
    import tempfile

    from distributed import Client

    from batchseg.cluster import _cpu_cluster
    from batchseg.config import ClusterSettings, EmbedConfig, ModelSettings
    from batchseg.models.clip import ClipSpec
    from batchseg.models.sam import SamSpec
    from batchseg.stages.embed import run_embed

    imported_rss = common.current_rss_bytes()
    imported_peak = common.peak_rss_bytes()
    models = spec["models"]
    settings = ModelSettings(
        clip=ClipSpec(**models["clip"]) if models["clip"] else None,
        sam=SamSpec(**models["sam"]) if models["sam"] else None,
        clip_canvas=models["clip_canvas"],
        precision=models["precision"],
    )
    workers = spec["workers"]
    threads = max(1, (os.cpu_count() or 1) // workers)
    out = Path(spec["out"])
    scratch = tempfile.mkdtemp(prefix=".dask-", dir=spec["scratch"])
    cluster = _cpu_cluster(workers, threads, scratch)
    try:
        with Client(cluster) as client:
            workers_before = client.run(_worker_memory)
            config = EmbedConfig(
                source=Path(spec["source"]), out=out, models=settings,
                cluster=ClusterSettings(scheduler=cluster.scheduler_address),
                batch_size=spec["batch_size"], shard_size=spec["shard_size"],
            )
            with common.Timer() as timer:
                summary = run_embed(config, progress=False)
            workers_after = client.run(_worker_memory)
    finally:
        cluster.close()
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "images": summary.found,
        "computed": summary.computed,
        "ok": summary.ok,
        "seconds": timer.seconds,
        "driver_start_rss": start_rss,
        "driver_imported_rss": imported_rss,
        "driver_imported_peak": imported_peak,
        "driver_peak": common.peak_rss_bytes(),
        "worker_start_peak": max(v["peak"] for v in workers_before.values()),
        "worker_peak": max(v["peak"] for v in workers_after.values()),
        "worker_end_rss": max(v["rss"] for v in workers_after.values()),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


def run_child(args: argparse.Namespace, settings, source: Path, out: Path, scratch: Path) -> dict:
    spec = {
        "source": str(source),
        "out": str(out),
        "scratch": str(scratch),
        "models": settings_json(settings),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
    }
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child run on {source} failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def settings_json(settings) -> dict:
    from dataclasses import asdict

    return {
        "clip": asdict(settings.clip) if settings.clip else None,
        "sam": asdict(settings.sam) if settings.sam else None,
        "clip_canvas": settings.clip_canvas,
        "precision": settings.precision,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        common.setup_logging()
        return child(json.loads(args.child))
    common.setup_logging()

    folder, created = common.workdir(args.workdir, "bench-memory-")
    try:
        choice = common.model_choice(args, folder)
        settings = choice.settings()
        print("\n".join(common.machine_lines()))
        results = {}
        for label, count in (("small", args.small), ("large", args.large)):
            source = folder / f"images-{count}"
            if not source.exists():
                common.write_images(source, count, args.image_size)  # image i is the same in both folders
            out = folder / f"out-{count}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"{label}: embedding {count} images ...", flush=True)
            results[label] = run_child(args, settings, source, out, folder)
            got = results[label]
            if got["ok"] != count:
                raise SystemExit(f"{label} run: expected {count} images ok, got {got}")
            print(f"  {got['seconds']:.1f} s", flush=True)

        size = "small (40-120 px)" if args.image_size is None else f"{args.image_size[0]}x{args.image_size[1]} JPEG"
        print(f"\nimages: {size}; batch {args.batch_size}, shard {args.shard_size}, {args.workers} worker(s); "
              f"models: clip {args.clip}, sam {args.sam}, {args.precision}")
        small, large = results["small"], results["large"]
        per_k = 1000 / (args.large - args.small)

        def rowfor(what: str, key: str, gated: bool) -> tuple:
            a, b = small[key], large[key]
            r = b / a if a else float("nan")
            verdict = ("ok" if r <= args.target else "OVER") if gated else ""
            return (what, common.mib(a), common.mib(b), f"{r:.3f}", common.mib((b - a) * per_k), verdict)

        rows = [
            rowfor("driver peak RSS (includes the Dask scheduler)", "driver_peak", True),
            rowfor("worker peak RSS (largest over workers)", "worker_peak", True),
            rowfor("driver RSS after imports (fixed)", "driver_imported_rss", False),
            rowfor("worker peak before the run (fixed)", "worker_start_peak", False),
            rowfor("worker RSS at the end", "worker_end_rss", False),
        ]
        headers = ("process", f"{args.small} images MiB", f"{args.large} images MiB", "large/small",
                   "growth MiB per 1000 images", f"target <= {args.target}")
        print()
        print(common.table(headers, rows))
        grow = (large["driver_peak"] - large["driver_imported_rss"], small["driver_peak"] - small["driver_imported_rss"])
        print(f"\ndriver peak above its post-import RSS: {common.mib(grow[1])} MiB at {args.small}, "
              f"{common.mib(grow[0])} MiB at {args.large} images")
        print(f"run times: {small['seconds']:.1f} s ({args.small}), {large['seconds']:.1f} s ({args.large})")
        if args.small < min(args.shard_size, 2 * args.batch_size):
            print("note: the small run is smaller than a shard's prefetch queue, so the workers' peaks differ by "
                  "queue fill, not by dataset size; the per-1000 growth column is noise at these sizes")
        print(common.load_line())
        return 0
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
