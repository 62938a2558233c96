"""Students (issue 11): quality against their teacher, NMS variants in crowds, speed and size.

On the synthetic world (``batchseg.world``, exact ground truth), with the toy models
batchseg ships as the teacher (``batchseg/assets``):

1. **teacher**: ``embed`` + ``pseudolabel --background --rounds R`` on ``--train-images``
   images of world seed 6000 (the students' training set), and the same on held-out
   sets: ``--test-images`` of seed 6001 and ``--crowd-images`` crowded ones (seed 6002,
   up to 10 objects each, many overlapping), so the teacher's labels of the held-out
   images can be scored too;
2. **semantic students**, one per ``--blocks`` kind (conv, attention, dynamic,
   dynamic-dw: nearly equal parameter counts by construction), trained with
   ``train-student`` on the last round's labels, applied with ``predict`` to the
   held-out set and scored with ``evaluate``: mIoU vs the teacher's round 0 and last
   round on the same images (target: student >= teacher), plus the loss per epoch;
3. **instance student** (YOLACT) trained on the round's instance rows, applied to the
   crowded set with Fast NMS and with NOH-NMS: COCO mask AP and AR@100 (pycocotools)
   against the ground truth, beside the teacher's own instance rows (round 0, SAM);
4. **speed**: seconds per image of the teacher pipeline with real-size models (CLIP
   ViT-B/16 + SAM ViT-B, random init: same cost as trained) on ``--teacher-images``
   640x480 images: embed + pseudolabel round 0 (``--points-per-side``), vs the students
   on the same images in-process (decode, letterbox, forward, label rows), 1 thread
   each; target >= 20x. Model sizes in MB (safetensors).

    .venv/bin/python bench/students.py                                  # defaults below
    .venv/bin/python bench/students.py --train-images 16 --test-images 8 --epochs 3 --teacher-images 0   # smoke
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import _common as common

TRAIN_SEED, TEST_SEED, CROWD_SEED = 6000, 6001, 6002
BLOCKS = ("conv", "attention", "dynamic", "dynamic-dw")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=24)
    parser.add_argument("--crowd-images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="teacher self-training rounds (default 1)")
    parser.add_argument("--points-per-side", type=int, default=16, help="SAM everything-mode grid (default 16)")
    parser.add_argument("--epochs", type=int, default=30, help="student epochs (default 30)")
    parser.add_argument("--instance-epochs", type=int, default=40, help="YOLACT epochs (default 40)")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--conf-thresh", type=float, default=0.3, help="students ignore label rows below this (0.3)")
    parser.add_argument("--class-balance", type=float, default=0.5, help="semantic students' class balance (0.5)")
    parser.add_argument("--blocks", default=",".join(BLOCKS), help="semantic students to train (comma list)")
    parser.add_argument("--teacher-images", type=int, default=2, help="640x480 images for the speed row (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker (default 1)")
    parser.add_argument("--workdir", default=None, help="keep everything here (default: a temp folder, deleted)")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def _labelled(world: Path, out: Path, args, cluster) -> None:
    from batchseg.assets import TOY_CLIP_DIR, TOY_SAM_CHECKPOINT
    from batchseg.config import EmbedConfig, LabelSettings, ModelSettings, PseudolabelConfig
    from batchseg.labels.proposals import ProposalSettings
    from batchseg.labels.selftrain import SelfTrainSettings
    from batchseg.models.clip import ClipSpec
    from batchseg.models.sam import SamSpec
    from batchseg.models.text import MASKCLIP_TEMPLATES, load_vocab_file
    from batchseg.stages.embed import run_embed
    from batchseg.stages.pseudolabel import run_pseudolabel

    models = ModelSettings(clip=ClipSpec(f"local-dir:{TOY_CLIP_DIR}"), sam=SamSpec("tiny", str(TOY_SAM_CHECKPOINT)),
                           precision="fp32")
    run_embed(EmbedConfig(source=world / "images", out=out, models=models, cluster=cluster, shard_size=32),
              progress=False)
    labels = LabelSettings(vocabulary=load_vocab_file(world / "classes.txt"), templates=MASKCLIP_TEMPLATES,
                           background=True, proposals=ProposalSettings(points_per_side=args.points_per_side))
    run_pseudolabel(PseudolabelConfig(out=out, labels=labels, selftrain=SelfTrainSettings(), rounds=args.rounds,
                                      cluster=cluster, shard_size=32), progress=False)


def _miou(out: Path, gt: Path) -> dict[tuple[int, str], float]:
    from batchseg.stages.evaluate import EvaluateConfig, run_evaluate

    report = run_evaluate(EvaluateConfig(out=out, gt=gt))
    return {(r.round, r.source): r.scores.miou for r in report.results}


def _coco_ap(dest: Path, world: Path, round_index: int = 0, source: str = "student") -> tuple[float, float, float]:
    """COCO mask AP, AP50 and AR@100 of ``dest``'s instance rows against the world's instances.json."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from batchseg.io.tables import read_labels, read_manifest

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(world / "gt" / "instances.json"))
    ids = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
    by_image = {r["image_id"]: ids[Path(r["path"]).name] for r in read_manifest(dest).to_pylist() if r["status"] == "ok"}
    results = [
        {"image_id": by_image[r["image_id"]], "category_id": r["class_id"] + 1, "score": float(r["score"]),
         "segmentation": {"size": r["mask"]["size"], "counts": r["mask"]["counts"]}}
        for r in read_labels(dest, round_index).to_pylist()
        if r["kind"] == "instance" and r["source"] == source and r["class_name"] != "background"
    ]
    if not results:
        return 0.0, 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, gt.loadRes(results), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1]), float(evaluation.stats[8])


def _train(out: Path, name: str, kind: str, blocks: str, epochs: int, args, scheduler: str) -> Path:
    from click.testing import CliRunner

    from batchseg.cli import cli

    result = CliRunner().invoke(cli, [
        "train-student", str(out), "--kind", kind, "--name", name, "--blocks", blocks, "--epochs", str(epochs),
        "--input-size", str(args.input_size), "--conf-thresh", str(args.conf_thresh),
        "--class-balance", str(args.class_balance), "--threads", str(args.threads),
        "--scheduler", scheduler, "--overwrite", "-q"], catch_exceptions=False)
    if result.exit_code:
        raise RuntimeError(result.output)
    return out / "students" / name


def _predict(student: Path, images: Path, dest: Path, scheduler: str, args) -> None:
    from batchseg.config import ClusterSettings
    from batchseg.stages.predict import PredictConfig, run_predict

    shutil.rmtree(dest, ignore_errors=True)
    run_predict(PredictConfig(student=student, source=images, dest=dest, cluster=ClusterSettings(
        scheduler=scheduler, torch_threads=args.threads), shard_size=32), progress=False)


def _losses(student: Path) -> list[float]:
    import pyarrow.dataset as ds

    table = ds.dataset(student / "metrics", format="parquet").to_table().sort_by("epoch")
    return table.column("loss").to_pylist()


def _student_seconds_per_image(student: Path, images: list[Path], threads: int) -> float:
    """Decode, letterbox, forward and label rows, in this process, per image."""
    import torch

    from batchseg.io.images import decode_image, read_image_bytes
    from batchseg.students.load import load_student
    from batchseg.students.predict import (instance_label_rows, instance_outputs, prepare, semantic_label_rows,
                                           semantic_probs)

    torch.set_num_threads(threads)
    loaded = load_student(student)

    def one(path: Path) -> None:
        image = decode_image(read_image_bytes(str(path)))
        pixels, valid = prepare(image.pixels, loaded.input_size)
        if loaded.kind == "instance":
            out = instance_outputs(loaded, pixels[None])
            instance_label_rows(loaded, out, 0, "x", image.height, image.width, valid)
        else:
            semantic_label_rows(loaded, semantic_probs(loaded, pixels[None])[0], "x", image.height, image.width, valid)

    one(images[0])  # warm-up
    start = time.perf_counter()
    rounds = max(1, 20 // len(images))
    for _ in range(rounds):
        for path in images:
            one(path)
    return (time.perf_counter() - start) / (rounds * len(images))


def _teacher_seconds_per_image(folder: Path, images: Path, count: int, args, cluster) -> tuple[float, float]:
    """(embed s/image, pseudolabel round 0 s/image) with CLIP ViT-B/16 + SAM ViT-B (random init)."""
    from batchseg.config import EmbedConfig, LabelSettings, ModelSettings, PseudolabelConfig
    from batchseg.labels.proposals import ProposalSettings
    from batchseg.labels.selftrain import SelfTrainSettings
    from batchseg.models.clip import ClipSpec
    from batchseg.models.sam import SamSpec
    from batchseg.models.text import MASKCLIP_TEMPLATES, parse_classes
    from batchseg.stages.embed import run_embed
    from batchseg.stages.pseudolabel import run_pseudolabel

    out = folder / "teacher-speed"
    shutil.rmtree(out, ignore_errors=True)
    models = ModelSettings(clip=ClipSpec("ViT-B-16", None), sam=SamSpec("vit_b", None), precision="bf16")
    embed = run_embed(EmbedConfig(source=images, out=out, models=models, cluster=cluster), progress=False)
    labels = LabelSettings(vocabulary=parse_classes("cat,dog,car,tree,person,road,sky,building,grass,water"),
                           templates=MASKCLIP_TEMPLATES, proposals=ProposalSettings(points_per_side=args.points_per_side))
    label = run_pseudolabel(PseudolabelConfig(out=out, labels=labels, selftrain=SelfTrainSettings(), rounds=0,
                                              cluster=cluster), progress=False)
    return embed.shard_seconds / count, label.rounds[0].seconds / count


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    from distributed import Client, LocalCluster

    from batchseg.config import ClusterSettings
    from batchseg.world import write_world

    folder, created = common.workdir(args.workdir, "bench-students-")
    results: dict = {"args": vars(args)}
    try:
        print("\n".join(common.machine_lines()), flush=True)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.CRITICAL, env=common.thread_env(args.threads),
                          local_directory=str(folder / "dask")) as cluster, Client(cluster):
            scheduler = cluster.scheduler_address
            external = ClusterSettings(scheduler=scheduler, torch_threads=args.threads)
            worlds = {"train": (TRAIN_SEED, args.train_images, {}), "test": (TEST_SEED, args.test_images, {}),
                      "crowd": (CROWD_SEED, args.crowd_images, {"max_objects": 10, "min_side": 96})}
            builds = {}
            for name, (seed, count, extra) in worlds.items():
                tick = time.perf_counter()
                world = folder / f"world-{name}"
                if not (world / "images").exists():
                    write_world(world, count, seed=seed, **extra)
                builds[name] = folder / f"build-{name}"
                if not (builds[name] / "labels").exists():
                    _labelled(world, builds[name], args, external)
                print(f"teacher labels of {name} ({count} images, seed {seed}): {time.perf_counter() - tick:.0f} s",
                      flush=True)
            last = args.rounds
            teacher = _miou(builds["test"], folder / "world-test" / "gt")
            results["teacher_miou"] = {f"round {k} {s}": v for (k, s), v in teacher.items()}

            semantic_rows, semantic = [], {}
            for blocks in [b for b in args.blocks.split(",") if b]:
                tick = time.perf_counter()
                student = _train(builds["train"], f"sem-{blocks}", "semantic", blocks, args.epochs, args, scheduler)
                train_seconds = time.perf_counter() - tick
                dest = folder / f"pred-{blocks}"
                _predict(student, folder / "world-test" / "images", dest, scheduler, args)
                miou = _miou(dest, folder / "world-test" / "gt")[(0, "student")]
                config = json.loads((student / "config.json").read_text())
                losses = _losses(student)
                semantic[blocks] = {"miou": miou, "parameters": config["parameters"], "size_mb": config["size_mb"],
                                    "losses": losses, "train_seconds": train_seconds, "folder": str(student)}
                marks = [losses[i] for i in sorted({0, len(losses) // 4, len(losses) // 2, len(losses) - 1})]
                semantic_rows.append([blocks, config["parameters"], f"{config['size_mb']:.2f}",
                                      " / ".join(f"{v:.3f}" for v in marks), f"{100 * miou:.1f}",
                                      f"{train_seconds:.0f}"])
                print(f"semantic student {blocks}: mIoU {100 * miou:.1f} ({train_seconds:.0f} s)", flush=True)
            results["semantic"] = semantic

            tick = time.perf_counter()
            yolact = _train(builds["train"], "yolact", "instance", "conv", args.instance_epochs, args, scheduler)
            instance_seconds = time.perf_counter() - tick
            instance_rows = []
            crowd = folder / "world-crowd"
            ap = _coco_ap(builds["crowd"], crowd, 0, "sam")
            instance_rows.append(["teacher: round 0 SAM masks recognised by CLIP", *(f"{100 * v:.1f}" for v in ap)])
            results["instance"] = {"teacher": ap}
            for nms in ("fast", "noh"):
                variant = folder / f"yolact-{nms}"
                shutil.rmtree(variant, ignore_errors=True)
                shutil.copytree(yolact, variant)
                config = json.loads((variant / "config.json").read_text())
                config["inference"] = {"nms": nms, "nms_thresh": 0.5}
                (variant / "config.json").write_text(json.dumps(config))
                dest = folder / f"pred-yolact-{nms}"
                _predict(variant, crowd / "images", dest, scheduler, args)
                ap = _coco_ap(dest, crowd)
                results["instance"][nms] = ap
                instance_rows.append([f"student YOLACT, {'Fast NMS' if nms == 'fast' else 'NOH-NMS'}",
                                      *(f"{100 * v:.1f}" for v in ap)])

            speed_rows = []
            if args.teacher_images:
                images = folder / "speed-images"
                if not images.exists():
                    common.write_images(images, args.teacher_images, (640, 480), seed=3)
                paths = sorted(p for p in images.rglob("*") if p.is_file())
                embed_s, label_s = _teacher_seconds_per_image(folder, images, args.teacher_images, args, external)
                teacher_s = embed_s + label_s
                speed_rows.append(["teacher: embed (ViT-B/16 + SAM ViT-B) + pseudolabel round 0",
                                   f"{teacher_s:.3f}", f"{1 / teacher_s:.3f}", "1.0", "-"])
                for label, student in (("semantic student (conv)", Path(semantic.get("conv", {}).get("folder", ""))),
                                       ("instance student (YOLACT, Fast NMS)", folder / "yolact-fast")):
                    if not (student / "config.json").exists():
                        continue
                    s = _student_seconds_per_image(student, paths, args.threads)
                    size = json.loads((student / "config.json").read_text())["size_mb"]
                    speed_rows.append([label, f"{s:.4f}", f"{1 / s:.1f}", f"{teacher_s / s:.0f}", f"{size:.2f}"])
                results["speed"] = {"teacher_embed_s": embed_s, "teacher_label_s": label_s, "rows": speed_rows}

        print(f"\nsemantic: mIoU (%) on {args.test_images} held-out images of seed {TEST_SEED}, 13 classes; "
              f"students learnt {args.epochs} epochs from round {last} of {args.train_images} images of seed {TRAIN_SEED}")
        teacher_rows = [[f"teacher round {k}, {s}", "-", "-", "-", f"{100 * v:.1f}", "-"] for (k, s), v in teacher.items()]
        print(common.table(["labels", "parameters", "MB", "loss (epoch 1 / 1/4 / 1/2 / last)", "mIoU", "train s"],
                           teacher_rows + semantic_rows))
        print(f"\ninstance: COCO mask metrics (%) on {args.crowd_images} crowded images of seed {CROWD_SEED}; "
              f"YOLACT learnt {args.instance_epochs} epochs ({instance_seconds:.0f} s)")
        print(common.table(["instances", "AP", "AP50", "AR@100"], instance_rows))
        if speed_rows:
            print(f"\nspeed: {args.teacher_images} images 640x480, {args.threads} thread(s), "
                  f"{args.points_per_side}x{args.points_per_side} SAM points")
            print(common.table(["pipeline", "s/image", "images/s", "speed-up vs teacher", "MB"], speed_rows))
        print(common.load_line())
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
