"""Cost of one pseudolabel round relative to one embed pass over the same images.

The pipeline's promise is that labelling is cheap once the heavy encoders have run:
a pseudolabel round should cost at most a tenth of the embed pass (target <= 0.1).
Everything runs on one Dask LocalCluster started here (``--workers`` processes, one
Dask thread each, ``OMP/MKL/OPENBLAS_NUM_THREADS = cores / workers``) and passed to
the stages as ``ClusterSettings(scheduler=ADDRESS)``, so cluster start-up is in no
number below. Before timing, a warm-up build (``--warmup-images`` other images) runs
``run_embed`` and ``run_pseudolabel`` (2x2 points, 1 epoch) on the same cluster, so
the workers have loaded and cached CLIP, the SAM encoder and the SAM decoder, and
the text classifier (computed by the driver, once per build) is copied into the
measured build.

Measured, on ``--images`` generated photo-like images:

1. **embed** (the baseline): ``run_embed``; ``EmbedSummary.shard_seconds`` (first
   shard submitted to last committed: what scales with the dataset) and its wall time.
2. **round 0**: ``run_pseudolabel(rounds=0)``: MaskCLIP labels from the stored CLIP
   features, SAM everything-mode proposals decoded from the stored SAM embeddings
   (``--points-per-side`` grid, ``--pred-iou-thresh``, ``--stability-thresh``: the
   CLI's defaults), mask recognition, semantic refinement, Parquet/Zarr writes.
   ``PseudolabelSummary.rounds[0].seconds``.
3. **round 1**: ``run_pseudolabel(rounds=1)`` on the same build: round 0 is complete
   and skipped, round 1 trains the self-training head (``--epochs``) on round 0's
   targets and labels every image again (SAM masks are re-read, not re-decoded).
   ``rounds[1].seconds``.
4. (breakdown, skip with ``--no-breakdown``) **round 0 without SAM**: MaskCLIP only,
   ``--no-sam`` (the rounds are recomputed in the same build), to show what the SAM
   proposals cost.

Ratio = round seconds / embed shard seconds (and / embed wall). Models are random-init
(ViT-B-16 + SAM vit_b by default; speed does not depend on the weights, but a random
SAM's predicted IoUs are near 0, so with the default 0.88 threshold its masks are all
filtered after decoding; the decoder runs for every point either way, and it is the
dominant cost). Note that with ``checkpoint=None`` each process draws its own random
SAM, so embed's encoder and pseudolabel's decoder are different random models: fine
for speed, meaningless for quality.

    .venv/bin/python bench/pseudolabel_vs_embed.py                                   # ViT-B-16 + vit_b, 8 images 640x480
    .venv/bin/python bench/pseudolabel_vs_embed.py --clip tiny --sam tiny --images 4 --image-size small --points-per-side 4  # smoke
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

import _common as common

DEFAULT_CLASSES = "person,car,tree,dog,cat,building,road,sky,grass,water"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="images to embed and label (default 8)")
    parser.add_argument("--warmup-images", type=int, default=1, help="images of the untimed warm-up build (default 1)")
    parser.add_argument("--image-size", type=common.parse_image_size, default=(640, 480),
                        help="WIDTHxHEIGHT of the generated JPEGs, or 'small' (default 640x480)")
    parser.add_argument("--batch-size", type=int, default=8, help="embed: images per forward pass (default 8)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="images per shard task, both stages (default 64, or fewer so every worker gets one)")
    parser.add_argument("--workers", type=int, default=1, help="local cluster worker processes (default 1)")
    parser.add_argument("--cores", type=int, default=common.cores(), help="total cores, split over the workers (default: all)")
    group = parser.add_argument_group("pseudolabel settings (defaults: the CLI's)")
    group.add_argument("--classes", default=DEFAULT_CLASSES, help=f"vocabulary (default {DEFAULT_CLASSES!r})")
    group.add_argument("--points-per-side", type=int, default=32, help="SAM point grid side (default 32)")
    group.add_argument("--pred-iou-thresh", type=float, default=0.88, help="default 0.88")
    group.add_argument("--stability-thresh", type=float, default=0.95, help="default 0.95")
    group.add_argument("--nms-thresh", type=float, default=0.7, help="default 0.7")
    group.add_argument("--epochs", type=int, default=8, help="self-training epochs of round 1 (default 8)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the extra round 0 without SAM")
    parser.add_argument("--workdir", default=None, help="keep images and outputs here (default: a temp folder, deleted)")
    common.add_model_options(parser, clip="ViT-B-16", sam="vit_b")
    args = parser.parse_args(argv)
    if min(args.images, args.warmup_images, args.batch_size, args.workers, args.cores, args.points_per_side,
           args.epochs) < 1:
        parser.error("counts and sizes must be at least 1")
    if args.sam == "none":
        parser.error("--sam none: this benchmark needs SAM (use --no-breakdown's counterpart, the breakdown row, "
                     "for MaskCLIP-only cost)")
    if args.shard_size is None:
        args.shard_size = min(64, math.ceil(args.images / args.workers))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    import dataclasses

    import torch
    from distributed import Client, LocalCluster

    from batchseg.config import ClusterSettings, EmbedConfig, LabelSettings, PseudolabelConfig
    from batchseg.io.tables import read_labels
    from batchseg.labels.proposals import ProposalSettings
    from batchseg.labels.selftrain import SelfTrainSettings
    from batchseg.models.text import MASKCLIP_TEMPLATES, parse_classes
    from batchseg.stages.embed import run_embed
    from batchseg.stages.pseudolabel import run_pseudolabel

    torch.set_num_threads(args.cores)  # the driver computes the text classifier
    folder, created = common.workdir(args.workdir, "bench-pseudolabel-")
    try:
        choice = common.model_choice(args, folder)
        settings = choice.settings()
        for name in ("images", "warm-images", "out", "out-warm"):
            shutil.rmtree(folder / name, ignore_errors=True)
        source = folder / "images"
        warm_source = folder / "warm-images"
        paths = common.write_images(source, args.images, args.image_size)
        # Other images (indices after the measured ones), so nothing is a duplicate.
        common.write_images(warm_source, args.warmup_images, args.image_size, start=args.images)
        n = len(paths)
        threads = max(1, args.cores // args.workers)
        size = "small (40-120 px)" if args.image_size is None else f"{args.image_size[0]}x{args.image_size[1]}"
        print("\n".join(common.machine_lines()))
        print(f"models: CLIP {args.clip}, SAM {args.sam} (random init), precision {args.precision}; {n} images {size}; "
              f"{args.workers} worker(s) x {threads} threads; embed batch {args.batch_size}, shard {args.shard_size}; "
              f"pseudolabel: {len(args.classes.split(','))} classes x {len(MASKCLIP_TEMPLATES)} templates, "
              f"{args.points_per_side}x{args.points_per_side} points, pred_iou {args.pred_iou_thresh}, "
              f"stability {args.stability_thresh}, NMS {args.nms_thresh}, {args.epochs} epochs", flush=True)

        proposals = ProposalSettings(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                                     stability_score_thresh=args.stability_thresh, box_nms_thresh=args.nms_thresh)
        labels = LabelSettings(vocabulary=parse_classes(args.classes), templates=MASKCLIP_TEMPLATES,
                               sam="on", proposals=proposals)
        selftrain = SelfTrainSettings(epochs=args.epochs)

        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.CRITICAL, env=common.thread_env(threads),
                          local_directory=str(folder / "dask")) as cluster, Client(cluster) as client:
            worker_threads = sorted(set(client.run(lambda: __import__("torch").get_num_threads()).values()))
            external = ClusterSettings(scheduler=cluster.scheduler_address)

            def embed(src: Path, out: Path):
                summary = run_embed(EmbedConfig(source=src, out=out, models=settings, cluster=external,
                                                batch_size=args.batch_size, shard_size=args.shard_size), progress=False)
                assert summary.ok == summary.computed == summary.found, summary
                return summary

            def label(out: Path, rounds: int, label_settings=labels, epochs: int = args.epochs):
                config = PseudolabelConfig(out=out, labels=label_settings,
                                           selftrain=dataclasses.replace(selftrain, epochs=epochs), rounds=rounds,
                                           cluster=external, shard_size=args.shard_size)
                with common.Timer() as wall:
                    summary = run_pseudolabel(config, progress=False)
                return summary, wall.seconds

            print("warm-up build (untimed: model loading, text classifier, first kernels) ...", flush=True)
            with common.Timer() as warm:
                embed(warm_source, folder / "out-warm")
                warm_labels = dataclasses.replace(labels, proposals=dataclasses.replace(proposals, points_per_side=2))
                label(folder / "out-warm", 1, warm_labels, epochs=1)

            print("embed ...", flush=True)
            out = folder / "out"
            with common.Timer() as embed_wall:
                embed_summary = embed(source, out)
            # Same CLIP spec, vocabulary and templates: the same text classifier file.
            shutil.copytree(folder / "out-warm" / "text", out / "text", dirs_exist_ok=True)

            print("pseudolabel round 0 ...", flush=True)
            r0, r0_wall = label(out, 0)
            round0 = r0.rounds[0]
            assert not round0.skipped and round0.images == n, r0
            instance = sum(1 for kind in read_labels(out, 0).column("kind").to_pylist() if kind == "instance")

            print("pseudolabel round 1 (self-training) ...", flush=True)
            r1, r1_wall = label(out, 1)
            assert r1.rounds[0].skipped and not r1.rounds[1].skipped and r1.rounds[1].images == n, r1
            round1 = r1.rounds[1]

            nosam = None
            if not args.no_breakdown:
                print("pseudolabel round 0 without SAM (breakdown) ...", flush=True)
                r0n, r0n_wall = label(out, 0, dataclasses.replace(labels, sam="off"))
                nosam = (r0n.rounds[0], r0n_wall)

        base = embed_summary.shard_seconds
        wall = embed_summary.seconds

        def row(name: str, seconds: float, target: str = "") -> tuple:
            return (name, f"{seconds:.2f}", f"{seconds / n:.3f}", common.ratio(seconds, base),
                    common.ratio(seconds, wall), target)

        rows = [
            row("embed: shard phase (EmbedSummary.shard_seconds), the baseline", base),
            row("embed: run_embed wall (planning, hashing, bookkeeping included)", wall),
            row(f"pseudolabel round 0 (MaskCLIP + SAM {args.points_per_side}x{args.points_per_side} proposals)",
                round0.seconds, "<= 0.1"),
            row(f"pseudolabel round 1 (self-training, {args.epochs} epochs, + relabel)", round1.seconds, "<= 0.1"),
        ]
        if nosam is not None:
            rows.append(row("  breakdown: round 0 without SAM (MaskCLIP only)", nosam[0].seconds))
        print()
        print(common.table(("phase", "seconds", "seconds/image", "ratio vs embed shard phase",
                            "ratio vs embed wall", "target"), rows))
        print()
        print(f"run_pseudolabel wall: rounds=0 {r0_wall:.2f} s, rounds=1 {r1_wall:.2f} s (round 0 skipped; includes "
              f"reading the build, text classifier from OUT/text, round bookkeeping)")
        print(f"round 0 wrote {round0.segments} label rows ({instance} SAM instance masks kept, "
              f"{instance / n:.1f}/image); round 1 wrote {round1.segments} rows")
        print(f"warm-up build {warm.seconds:.1f} s (untimed); worker torch threads {worker_threads}; "
              f"embed computed {embed_summary.computed} images at {embed_summary.images_per_second:.3f} images/s")
        print(common.load_line())
        return 0
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
