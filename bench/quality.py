"""Label quality on held-out synthetic-world images: every dense head, SAM, self-training rounds.

The synthetic world (``batchseg.world``) has exact ground truth, so this script
measures what each part of ``pseudolabel`` buys, with the toy models batchseg ships
(``batchseg/assets``) against a floor: the same CLIP architecture at random init
(and the same toy SAM). On ``--images`` world images of ``--seed`` (a seed no
training run used: the toy CLIPs train on world seed 100000, the toy SAM on 0,
their evaluations use 999 and the demo 4242), for each world variant
(``batchseg.world.WORLD_VARIANTS``: "default", the world everything was trained and
tuned on, and "crowded", which nobody tuned on) and each CLIP:

1. ``embed`` once (CLIP tokens + SAM embeddings, fp32);
2. round 0 once per dense head (``--dense-head``), with SAM: each run is scored twice,
   "HEAD" (the dense head's labels alone, pseudolabel's defaults: prompt denoising, and
   key smoothing off because SAM votes) and "HEAD + SAM (vote)" (SAM masks voting the
   map: the probability-pooling vote, pseudolabel's default); MaskCLIP also with
   CorrCLIP's majority vote, with background masks voting too, and with key smoothing on;
3. the full pipeline with ``--head`` (default maskclip): round 0 and ``--rounds``
   self-training rounds, each scored as the head's own labels and with SAM's vote
   (what ``pseudolabel`` writes).

Every row is ``batchseg evaluate``'s mIoU over 13 classes (12 "colour shape"
classes + background), pixel accuracy beside it. The label-time cost of each head
(seconds per image, the head alone on stored tokens) is printed below the table.

    .venv/bin/python bench/quality.py                     # 200 images per variant, 3 rounds, both CLIPs
    .venv/bin/python bench/quality.py --images 8 --rounds 1 --points-per-side 8 --variant default  # smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import _common as common

HELD_OUT_SEED = 5000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="held-out world images (default 200)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help=f"world seed (default {HELD_OUT_SEED})")
    parser.add_argument("--rounds", type=int, default=3, help="self-training rounds (default 3)")
    parser.add_argument("--points-per-side", type=int, default=32, help="SAM everything-mode grid (default 32)")
    parser.add_argument("--all-rounds", action="store_true",
                        help="run and score every round (stopping and drift rules off); default: pseudolabel's rules")
    parser.add_argument("--fine-canvas", type=int, default=0,
                        help="embed --fine-canvas: also store CLIP's tokens at this canvas, fused in round 0 (default 0: none)")
    parser.add_argument("--epochs", type=int, default=8, help="self-training epochs per round (default 8)")
    parser.add_argument("--clip", default=None,
                        help="toy CLIP local-dir folder (default: the shipped ConvNeXt one, else the ViT one)")
    parser.add_argument("--sam-checkpoint", default=None, help="toy SAM checkpoint (default: the shipped one)")
    parser.add_argument("--which", choices=("both", "toy", "floor"), default="both",
                        help="measure the toy CLIP, the random-init floor, or both (default both)")
    parser.add_argument("--workers", type=int, default=1, help="local cluster worker processes (default 1)")
    parser.add_argument("--cores", type=int, default=common.cores(), help="total cores (default: all)")
    parser.add_argument("--shard-size", type=int, default=32, help="images per Dask task (default 32)")
    parser.add_argument("--variant", choices=("both", "default", "crowded"), default="both",
                        help="world variant(s) (default both: the tuned-on world and one nobody tuned on)")
    parser.add_argument("--heads", default=",".join(HEADS), help="dense heads to compare (comma-separated)")
    parser.add_argument("--head", default="maskclip", help="dense head of the full pipeline (default maskclip)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--workdir", default=None, help="keep world and builds here (default: a temp folder, deleted)")
    args = parser.parse_args(argv)
    args.heads = tuple(h for h in args.heads.split(",") if h)
    if not set(args.heads) <= set(HEADS) or args.head not in HEADS:
        parser.error(f"heads must be among {', '.join(HEADS)}")
    if min(args.images, args.points_per_side, args.epochs, args.workers, args.cores, args.shard_size) < 1:
        parser.error("counts must be at least 1")
    if args.rounds < 0:
        parser.error("--rounds must be 0 or more")
    return args


def _toy_models(args) -> tuple[Path, Path]:
    from batchseg.assets import TOY_CLIP_CNN_DIR, TOY_CLIP_DIR, TOY_SAM_CHECKPOINT

    shipped_cnn = (TOY_CLIP_CNN_DIR / "open_clip_model.safetensors").exists()
    clip = Path(args.clip) if args.clip else (TOY_CLIP_CNN_DIR if shipped_cnn else TOY_CLIP_DIR)
    sam = Path(args.sam_checkpoint) if args.sam_checkpoint else TOY_SAM_CHECKPOINT
    for path, what in ((clip / "open_clip_config.json", "toy CLIP"), (sam, "toy SAM")):
        if not path.exists():
            sys.exit(f"quality: no {what} at {path} (train it with examples/train_toy_*.py, or pass its path)")
    return clip, sam


def _random_clip(toy_clip: Path, folder: Path) -> Path:
    """The toy CLIP's architecture at random init (seed 0): the floor."""
    from batchseg.models.clip import save_local_dir

    config = json.loads((toy_clip / "open_clip_config.json").read_text())["model_cfg"]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that the fresh folder has no weights yet
    try:
        return save_local_dir(config, folder, seed=0)
    finally:
        root.setLevel(level)


HEADS = ("maskclip", "value", "clearclip", "sclip", "naclip", "proxy-sam")


def _runs(args):
    """(name, LabelSettings changes, rounds) of every pseudolabel run, in order."""
    from batchseg.models.dense_heads import DenseHeadSettings

    runs = [(head, dict(dense_head=DenseHeadSettings(head), sam="on"), 0) for head in args.heads]
    if "maskclip" in args.heads:
        runs.append(("maskclip (majority vote)", dict(region_vote="majority", sam="on"), 0))
        runs.append(("maskclip (background masks vote too)", dict(bg_mask_vote=True, sam="on"), 0))
        runs.append(("maskclip (key smoothing on)", dict(key_smoothing="on", sam="on"), 0))
    if args.rounds:
        runs.append(("full", dict(dense_head=DenseHeadSettings(args.head), sam="on"), args.rounds))
    return runs


def _head_seconds(out: Path, heads, clip_dir: Path, images: int) -> dict[str, float]:
    """Seconds per image of each dense head alone, on the stored tokens (1 thread, CPU)."""
    import numpy as np
    import torch
    import zarr

    from batchseg.models.clip import ClipSpec, load_dense_clip
    from batchseg.models.dense_heads import DenseHeadSettings, compute_head

    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    clip = load_dense_clip(ClipSpec(f"local-dir:{clip_dir}"))
    count = min(images, 32)
    tokens = torch.from_numpy(np.stack([group["clip_tokens"][i] for i in range(count)]))
    cls = torch.from_numpy(np.stack([group["clip_cls"][i] for i in range(count)])) if "clip_cls" in group else None
    sam = torch.from_numpy(np.stack([group["sam"][i] for i in range(count)]))
    seconds = {}
    with torch.inference_mode():
        for head in heads:
            started = time.perf_counter()
            for i in range(count):
                compute_head(clip, DenseHeadSettings(head), tokens[i : i + 1],
                             None if cls is None else cls[i : i + 1], sam[i : i + 1])
            seconds[head] = (time.perf_counter() - started) / count
    return seconds


def _measure_clip(name: str, clip_dir: Path, sam_ckpt: Path, world: Path, out: Path, args, external) -> dict:
    """Embed ``world/images`` with this CLIP, run every variant, return {row: (mIoU, pixAcc)} and facts."""
    from batchseg.config import EmbedConfig, LabelSettings, ModelSettings, PseudolabelConfig
    from batchseg.io.tables import read_labels
    from batchseg.labels.proposals import ProposalSettings
    from batchseg.models.clip import ClipSpec
    from batchseg.models.sam import SamSpec
    from batchseg.models.text import MASKCLIP_TEMPLATES, load_vocab_file
    from batchseg.stages.embed import run_embed
    from batchseg.stages.evaluate import EvaluateConfig, describe_source, run_evaluate
    from batchseg.stages.pseudolabel import run_pseudolabel

    models = ModelSettings(clip=ClipSpec(f"local-dir:{clip_dir}"), sam=SamSpec("tiny", str(sam_ckpt)),
                           precision="fp32", clip_fine_canvas=args.fine_canvas)
    started = time.perf_counter()
    summary = run_embed(EmbedConfig(source=world / "images", out=out, models=models, cluster=external,
                                    shard_size=args.shard_size), progress=False)
    if summary.ok != args.images:
        raise RuntimeError(f"embed stored {summary.ok} of {args.images} images: {summary}")
    print(f"  [{name}] embed: {summary.ok} images in {time.perf_counter() - started:.0f} s", flush=True)

    base = LabelSettings(vocabulary=load_vocab_file(world / "classes.txt"), templates=MASKCLIP_TEMPLATES,
                         background=True, proposals=ProposalSettings(points_per_side=args.points_per_side))
    rows: dict[str, tuple[float, float]] = {}
    facts: dict[str, object] = {}
    for run, changes, rounds in _runs(args):
        started = time.perf_counter()
        config = PseudolabelConfig(out=out, labels=dataclasses.replace(base, **changes),
                                   selftrain=_selftrain_settings(args), rounds=rounds,
                                   cluster=external, shard_size=args.shard_size, overwrite=True)
        run_pseudolabel(config, progress=False)
        report = run_evaluate(EvaluateConfig(out=out, gt=world / "gt"))
        scores = {(r.round, r.source): (r.scores.miou, r.scores.pixel_accuracy) for r in report.results}
        if run != "full":
            vote = "majority" if "majority" in run else "pool"
            if run.startswith("maskclip ("):
                rows[f"{run}: + SAM"] = scores[(0, "sam")]
                continue
            rows[run] = scores[(0, "maskclip")]
            rows[f"{run} + SAM ({vote} vote)"] = scores[(0, "sam")]
        else:
            for r in report.results:  # in round, source order
                rows[f"full ({args.head}) round {r.round}: {describe_source(r.round, r.source)}"] = (
                    r.scores.miou, r.scores.pixel_accuracy)
            kinds = read_labels(out, 0).column("kind").to_pylist()
            facts["SAM masks kept per image (instance rows)"] = round(kinds.count("instance") / args.images, 2)
            facts["rounds"] = _round_notes(out, args.rounds)
        print(f"  [{name}] {run}: {time.perf_counter() - started:.0f} s", flush=True)
    facts["head seconds per image"] = {k: round(v, 5) for k, v in _head_seconds(out, args.heads, clip_dir,
                                                                               args.images).items()}
    return {"rows": rows, "facts": facts}


def _selftrain_settings(args):
    from batchseg.labels.selftrain import SelfTrainSettings

    if args.all_rounds:  # score every round: neither the convergence nor the drift rule ends them
        return SelfTrainSettings(epochs=args.epochs, stop_agreement=None, drift_tolerance=1.0)
    return SelfTrainSettings(epochs=args.epochs)


def _round_notes(out: Path, rounds: int) -> list:
    """What each self-training round recorded about itself (agreement, stop decisions)."""
    from batchseg.io.build_info import read_round_file

    notes = []
    for k in range(1, rounds + 1):
        info = read_round_file(out, k)
        if info is not None:
            notes.append({"round": k, "agreement": info["stats"].get("agreement_with_previous"),
                          "anchor_agreement": info["stats"].get("anchor_agreement"),
                          "discarded": bool(info.get("discarded")), "decision": info.get("decision")})
    return notes


def _table(results: dict[str, dict]) -> str:
    names = list(results)
    order: list[str] = []
    for result in results.values():
        order += [row for row in result["rows"] if row not in order]
    headers = ["labels", *(f"{n} mIoU" for n in names), *(f"{n} pixAcc" for n in names)]
    body = []
    for row in order:
        cells = [results[n]["rows"].get(row) for n in names]
        body.append([row, *(f"{c[0] * 100:.1f}" if c else "-" for c in cells),
                     *(f"{c[1] * 100:.1f}" if c else "-" for c in cells)])
    return common.table(headers, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    from distributed import Client, LocalCluster

    from batchseg.config import ClusterSettings
    from batchseg.world import WORLD_VARIANTS, write_world

    toy_clip, toy_sam = _toy_models(args)
    folder, created = common.workdir(args.workdir, "bench-quality-")
    variants = list(WORLD_VARIANTS) if args.variant == "both" else [args.variant]
    try:
        clips = {}
        if args.which in ("both", "toy"):
            clips["toy CLIP"] = toy_clip
        if args.which in ("both", "floor"):
            clips["random-init CLIP"] = _random_clip(toy_clip, folder / "random-clip")
        print("\n".join(common.machine_lines()))
        print(f"world seed {args.seed}: {args.images} images per variant ({', '.join(variants)}); toy CLIP "
              f"{toy_clip}; toy SAM {toy_sam}; {args.points_per_side}x{args.points_per_side} points; "
              f"{args.rounds} self-training rounds x {args.epochs} epochs; full pipeline head {args.head}; fine canvas "
              f"{args.fine_canvas or 'none'}", flush=True)
        threads = max(1, args.cores // args.workers)
        results = {}
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.CRITICAL, env=common.thread_env(threads),
                          local_directory=str(folder / "dask")) as cluster, Client(cluster):
            external = ClusterSettings(scheduler=cluster.scheduler_address)
            for variant in variants:
                world = folder / f"world-{variant}"
                shutil.rmtree(world, ignore_errors=True)
                write_world(world, args.images, seed=args.seed, options=WORLD_VARIANTS[variant])
                for index, (name, clip_dir) in enumerate(clips.items()):
                    out = folder / f"out-{variant}-{index}"
                    shutil.rmtree(out, ignore_errors=True)
                    key = f"{variant}: {name}"
                    results[key] = _measure_clip(key, clip_dir, toy_sam, world, out, args, external)
        print("\nmIoU and pixel accuracy (%), 13 classes (12 + background), "
              f"{args.images} held-out images of world seed {args.seed} per variant:")
        print(_table(results))
        for name, result in results.items():
            print(f"{name}: " + "; ".join(f"{k} {v}" for k, v in result["facts"].items()))
        print(common.load_line())
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
