"""Pipeline efficiency of `batchseg embed`: end-to-end images/s over bare model-forward images/s.

Same images, same models, batch size, precision and total cores in both:

* **bare forward** (the baseline, in this process): every image is read, decoded and
  preprocessed first (not timed), exactly as a shard worker does it; then only the
  model forwards are timed: ``batchseg.stages.embed_shard._forward`` on batches of
  ``--batch-size`` (CLIP dense + SAM encoder, the worker's autocast, outputs to fp16
  NumPy), with ``torch.set_num_threads(cores)``. One batch runs first, untimed, to
  warm up kernels.
* **embed cold**: ``run_embed`` into a fresh OUT with a local cluster it starts itself
  (``--workers`` processes, as the CLI does): wall time including cluster start,
  model load, hashing, decoding, forwards, Zarr/Parquet writes and cluster shutdown.
* **embed warm**: a LocalCluster started here (``--workers`` processes, one Dask thread
  each, ``OMP/MKL/OPENBLAS_NUM_THREADS = cores / workers``) is passed to ``run_embed``
  as ``ClusterSettings(scheduler=ADDRESS)``. A first run loads and caches the models
  in the workers (reported as "embed first run on started cluster"); the measured run
  is a second ``run_embed --overwrite`` into the same OUT: the steady state of a long
  build. Reported twice: run_embed's wall time, and the shard span (first shard task
  start to last shard task end on the workers, from Dask's task stream), which leaves
  out the driver's hashing/planning before the first shard and its bookkeeping after.

Ratio = images/s of the row / images/s of bare forward; 1.0 means the pipeline adds
nothing to the model's own cost. Models are random-init (speed does not depend on
the weights). Nothing is written to RESULTS.md; paste the printed table there.

    .venv/bin/python bench/embed_efficiency.py                                # ViT-B-16 + SAM vit_b, 32 images
    .venv/bin/python bench/embed_efficiency.py --clip tiny --sam tiny --images 8   # smoke test
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import shutil
import sys
from pathlib import Path

import _common as common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images to embed (default 32)")
    parser.add_argument("--image-size", type=common.parse_image_size, default=(640, 480),
                        help="WIDTHxHEIGHT of the generated JPEGs, or 'small' (default 640x480)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the pipeline (default 1)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="images per shard task (default 64, or fewer so every worker gets a shard)")
    parser.add_argument("--cores", type=int, default=common.cores(),
                        help="total cores: torch threads of the baseline, split over the workers (default: all)")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold run (cluster start + model load)")
    parser.add_argument("--workdir", default=None, help="keep images and outputs here (default: a temp folder, deleted)")
    common.add_model_options(parser, clip="ViT-B-16", sam="vit_b")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.workers < 1 or args.cores < 1:
        parser.error("--images, --batch-size, --workers and --cores must be at least 1")
    if args.shard_size is None:
        args.shard_size = min(64, math.ceil(args.images / args.workers))
    return args


def bare_forward(settings, paths: list[Path], batch_size: int, threads: int) -> tuple[float, list, dict]:
    """Seconds of the timed forwards over all images; model description; facts."""
    import torch

    from batchseg.io.images import decode_image, read_image_bytes
    from batchseg.models import runtime
    from batchseg.models.clip import preprocess_clip
    from batchseg.models.runtime import ModelBuilders, get_models
    from batchseg.stages.embed_shard import _forward, _Prepared

    torch.set_num_threads(threads)
    with common.Timer() as load:
        models = get_models(settings, ModelBuilders(), "cpu")
    prepared = []
    with common.Timer() as prep:
        for path in paths:
            image = decode_image(read_image_bytes(str(path)))
            entry = _Prepared(item=None, row={})
            if models.clip is not None:
                clip = models.clip
                entry.clip_pixels = preprocess_clip(image.pixels, clip.canvas, clip.mean, clip.std)
            if models.sam is not None:
                entry.sam_pixels = models.sam.preprocess(image.pixels)
            prepared.append(entry)
    batches = [prepared[i : i + batch_size] for i in range(0, len(prepared), batch_size)]
    with common.Timer() as warm:
        _forward(models, batches[0])
    with common.Timer() as timed:
        for batch in batches:
            _forward(models, batch)
    described = common.describe_models(models)
    facts = {
        "model_load_s": load.seconds,
        "decode_preprocess_s": prep.seconds,
        "warmup_batch_s": warm.seconds,
        "torch_threads": torch.get_num_threads(),
    }
    del models, prepared, batches
    runtime._CACHE.clear()
    gc.collect()
    return timed.seconds, described, facts


def shard_span(records: list[dict]) -> tuple[float, float, int]:
    """(first start to last stop, summed busy seconds, count) of the run's shard tasks."""
    spans = []
    for record in records:
        key = str(record.get("key", ""))
        if "embed-" not in key:
            continue
        computes = [s for s in record.get("startstops", ()) if s.get("action") == "compute"]
        if computes:
            spans.append((min(s["start"] for s in computes), max(s["stop"] for s in computes)))
    if not spans:
        return 0.0, 0.0, 0
    return max(b for _, b in spans) - min(a for a, _ in spans), sum(b - a for a, b in spans), len(spans)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    from distributed import Client, LocalCluster, get_task_stream

    from batchseg.config import ClusterSettings, EmbedConfig
    from batchseg.stages.embed import run_embed

    folder, created = common.workdir(args.workdir, "bench-efficiency-")
    try:
        choice = common.model_choice(args, folder)
        settings = choice.settings()
        source = folder / "images"
        if source.exists():
            shutil.rmtree(source)
        paths = common.write_images(source, args.images, args.image_size)
        n = len(paths)
        size = "small (40-120 px)" if args.image_size is None else f"{args.image_size[0]}x{args.image_size[1]}"
        print("\n".join(common.machine_lines()))
        print(f"images: {n} generated, {size}, {common.folder_bytes(source) / n / 1024:.0f} KiB/image on disk; "
              f"batch {args.batch_size}, shard {args.shard_size}, precision {args.precision}, "
              f"{args.workers} worker(s) x {max(1, args.cores // args.workers)} threads, {args.cores} cores in all",
              flush=True)

        print("bare forward ...", flush=True)
        bare_s, described, facts = bare_forward(settings, paths, args.batch_size, args.cores)
        rows = [("bare forward (models only, driver process)", n, f"{bare_s:.2f}", f"{n / bare_s:.3f}", "1.000")]

        def config(out: Path, cluster: ClusterSettings, overwrite: bool = False) -> EmbedConfig:
            return EmbedConfig(source=source, out=out, models=settings, cluster=cluster,
                               batch_size=args.batch_size, shard_size=args.shard_size, overwrite=overwrite)

        def row(label: str, seconds: float) -> tuple:
            rate = n / seconds if seconds > 0 else 0.0
            return (label, n, f"{seconds:.2f}", f"{rate:.3f}", common.ratio(rate, n / bare_s))

        if not args.skip_cold:
            print("embed cold (run_embed starts its own cluster) ...", flush=True)
            out = folder / "out-cold"
            shutil.rmtree(out, ignore_errors=True)
            with common.Timer() as cold:
                summary = run_embed(config(out, ClusterSettings(workers=args.workers, torch_threads=max(1, args.cores // args.workers))),
                                    progress=False)
            assert summary.computed == n and summary.ok == n, summary
            rows.append(row("embed cold: run_embed wall (cluster start + model load + all)", cold.seconds))

        print("embed warm (started cluster, cached models) ...", flush=True)
        threads = max(1, args.cores // args.workers)
        out = folder / "out-warm"
        shutil.rmtree(out, ignore_errors=True)
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.CRITICAL, env=common.thread_env(threads),
                          local_directory=str(folder / "dask")) as cluster, Client(cluster) as client:
            worker_threads = sorted(set(client.run(lambda: __import__("torch").get_num_threads()).values()))
            external = ClusterSettings(scheduler=cluster.scheduler_address)
            with common.Timer() as first:
                summary = run_embed(config(out, external), progress=False)
            assert summary.computed == n and summary.ok == n, summary
            rows.append(row("embed first run on started cluster (model load included)", first.seconds))
            with get_task_stream(client=client) as stream, common.Timer() as warm:
                summary = run_embed(config(out, external, overwrite=True), progress=False)
            assert summary.computed == n and summary.ok == n, summary
            span, busy, shards = shard_span(stream.data)
        rows.append(row("embed warm: run_embed wall (--overwrite, models cached)", warm.seconds))
        if shards:
            rows.append(row(f"embed warm: shard span ({shards} shard(s), first start to last end)", span))

        print()
        print(common.table(("mode", "images", "seconds", "images/s", "ratio vs bare"), rows))
        print()
        print(common.table(("model", "size"), described))
        print()
        print(f"bare forward: model load {facts['model_load_s']:.1f} s, decode+preprocess {facts['decode_preprocess_s']:.2f} s "
              f"(untimed), warm-up batch {facts['warmup_batch_s']:.2f} s, torch threads {facts['torch_threads']}; "
              f"pipeline worker torch threads {worker_threads}")
        if shards:
            print(f"warm run: shard tasks busy {busy:.2f} s in all over {args.workers} worker(s); "
                  f"driver outside the shard span {warm.seconds - span:.2f} s")
        print(common.load_line())
        return 0
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
