"""Label quality on held-out synthetic-world images: the pipeline's stages, one by one.

The synthetic world (``batchseg.world``) has exact ground truth, so this script
measures what each part of ``pseudolabel`` buys, with the toy models batchseg ships
(``batchseg/assets``) against a floor: the same CLIP architecture at random init
(and the same toy SAM). On ``--images`` world images of ``--seed`` (a seed no
training run used: the toy CLIP trains on world seed 100000, the toy SAM on 0,
their evaluations use 999 and the demo 4242), for each CLIP:

1. ``embed`` once (CLIP dense features + SAM embeddings, fp32);
2. round 0 without SAM, four times, each evaluated (rows "MaskCLIP alone", "+ prompt
   denoising", "+ key smoothing", "+ PD + KS"): MaskCLIP labels with each
   refinement switched on or off (``LabelSettings.prompt_denoising/key_smoothing``);
3. the full default pipeline: PD + KS, SAM everything-mode proposals voting the
   semantic map ("round 0: MaskCLIP + SAM refinement"), then ``--rounds`` self-training rounds,
   each scored twice: the head's own labels ("round k: self-training head") and the
   same SAM masks voting them ("round k: head + SAM refinement"), which is what
   ``pseudolabel`` writes as the round's final labels.

Every row is ``batchseg evaluate``'s mIoU over 13 classes (12 "colour shape"
classes + background), pixel accuracy beside it. The classes and background are
those of ``classes.txt`` that ``write_world`` writes, with ``--background``, exactly
as the demo runs. One local Dask cluster serves all runs.

    .venv/bin/python bench/quality.py                     # 200 images, 3 rounds, both CLIPs
    .venv/bin/python bench/quality.py --images 8 --rounds 1 --points-per-side 8   # smoke
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
    parser.add_argument("--epochs", type=int, default=8, help="self-training epochs per round (default 8)")
    parser.add_argument("--clip", default=None, help="toy CLIP local-dir folder (default: the shipped one)")
    parser.add_argument("--sam-checkpoint", default=None, help="toy SAM checkpoint (default: the shipped one)")
    parser.add_argument("--which", choices=("both", "toy", "floor"), default="both",
                        help="measure the toy CLIP, the random-init floor, or both (default both)")
    parser.add_argument("--workers", type=int, default=1, help="local cluster worker processes (default 1)")
    parser.add_argument("--cores", type=int, default=common.cores(), help="total cores (default: all)")
    parser.add_argument("--shard-size", type=int, default=32, help="images per Dask task (default 32)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--workdir", default=None, help="keep world and builds here (default: a temp folder, deleted)")
    args = parser.parse_args(argv)
    if min(args.images, args.points_per_side, args.epochs, args.workers, args.cores, args.shard_size) < 1:
        parser.error("counts must be at least 1")
    if args.rounds < 0:
        parser.error("--rounds must be 0 or more")
    return args


def _toy_models(args) -> tuple[Path, Path]:
    from batchseg.assets import TOY_CLIP_DIR, TOY_SAM_CHECKPOINT

    clip = Path(args.clip) if args.clip else TOY_CLIP_DIR
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


def _variants(args):
    """(row name, LabelSettings changes, rounds) of every pseudolabel run, in order."""
    return [
        ("MaskCLIP alone", dict(prompt_denoising=False, key_smoothing=False, sam="off"), 0),
        ("+ prompt denoising (PD)", dict(prompt_denoising=True, key_smoothing=False, sam="off"), 0),
        ("+ key smoothing (KS)", dict(prompt_denoising=False, key_smoothing=True, sam="off"), 0),
        ("+ PD + KS (pseudolabel's default)", dict(prompt_denoising=True, key_smoothing=True, sam="off"), 0),
        ("full", dict(prompt_denoising=True, key_smoothing=True, sam="on"), args.rounds),
    ]


def _measure_clip(name: str, clip_dir: Path, sam_ckpt: Path, world: Path, out: Path, args, external) -> dict:
    """Embed ``world/images`` with this CLIP, run every variant, return {row: (mIoU, pixAcc)} and facts."""
    from batchseg.config import EmbedConfig, LabelSettings, ModelSettings, PseudolabelConfig
    from batchseg.io.tables import read_labels
    from batchseg.labels.proposals import ProposalSettings
    from batchseg.labels.selftrain import SelfTrainSettings
    from batchseg.models.clip import ClipSpec
    from batchseg.models.sam import SamSpec
    from batchseg.models.text import MASKCLIP_TEMPLATES, load_vocab_file
    from batchseg.stages.embed import run_embed
    from batchseg.stages.evaluate import EvaluateConfig, describe_source, run_evaluate
    from batchseg.stages.pseudolabel import run_pseudolabel

    models = ModelSettings(clip=ClipSpec(f"local-dir:{clip_dir}"), sam=SamSpec("tiny", str(sam_ckpt)),
                           precision="fp32")
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
    for row, changes, rounds in _variants(args):
        started = time.perf_counter()
        config = PseudolabelConfig(out=out, labels=dataclasses.replace(base, **changes),
                                   selftrain=SelfTrainSettings(epochs=args.epochs), rounds=rounds,
                                   cluster=external, shard_size=args.shard_size, overwrite=True)
        run_pseudolabel(config, progress=False)
        report = run_evaluate(EvaluateConfig(out=out, gt=world / "gt"))
        if row != "full":
            s = next(r.scores for r in report.results if (r.round, r.source) == (0, "maskclip"))
            rows[row] = (s.miou, s.pixel_accuracy)
        else:
            for r in report.results:  # in round, source order
                if (r.round, r.source) == (0, "maskclip"):
                    continue  # the "+ PD + KS" row: the same labels
                rows[f"round {r.round}: {describe_source(r.round, r.source)}"] = (r.scores.miou, r.scores.pixel_accuracy)
            kinds = read_labels(out, 0).column("kind").to_pylist()
            facts["SAM masks kept per image (instance rows)"] = round(kinds.count("instance") / args.images, 2)
        print(f"  [{name}] {row}: {time.perf_counter() - started:.0f} s", flush=True)
    return {"rows": rows, "facts": facts}


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
    from batchseg.world import write_world

    toy_clip, toy_sam = _toy_models(args)
    folder, created = common.workdir(args.workdir, "bench-quality-")
    try:
        world = folder / "world"
        shutil.rmtree(world, ignore_errors=True)
        write_world(world, args.images, seed=args.seed)
        clips = {}
        if args.which in ("both", "toy"):
            clips["toy CLIP"] = toy_clip
        if args.which in ("both", "floor"):
            clips["random-init CLIP"] = _random_clip(toy_clip, folder / "random-clip")
        print("\n".join(common.machine_lines()))
        print(f"world seed {args.seed}: {args.images} images; toy SAM {toy_sam}; {args.points_per_side}x"
              f"{args.points_per_side} points; {args.rounds} self-training rounds x {args.epochs} epochs", flush=True)
        threads = max(1, args.cores // args.workers)
        results = {}
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.CRITICAL, env=common.thread_env(threads),
                          local_directory=str(folder / "dask")) as cluster, Client(cluster):
            external = ClusterSettings(scheduler=cluster.scheduler_address)
            for index, (name, clip_dir) in enumerate(clips.items()):
                out = folder / f"out-{index}"
                shutil.rmtree(out, ignore_errors=True)
                results[name] = _measure_clip(name, clip_dir, toy_sam, world, out, args, external)
        print("\nmIoU and pixel accuracy (%), 13 classes (12 + background), "
              f"{args.images} held-out images of world seed {args.seed}:")
        print(_table(results))
        for name, result in results.items():
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result["facts"].items()))
        print(common.load_line())
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
