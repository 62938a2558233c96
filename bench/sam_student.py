"""The distilled SAM encoder (issue 12): speed against SAM ViT-B, mask quality against its teacher, the whole loop.

1. **speed**: images/s of the image encoder alone at SAM's 1024 canvas on the CPU,
   in this process, ``--threads`` threads, fp32, batch 1: the student architecture
   (``--width``/``--depth``, random init) vs SAM ViT-B (random init: same cost as
   trained). Target >= 10x. Parameters and weights MB (fp32 safetensors).
2. **mask quality**, with the shipped toy SAM (``batchseg/assets``) as the teacher:
   ``embed`` (toy CLIP + toy SAM) and ``pseudolabel --rounds 0`` on ``--train-images``
   world images of seed 7000, then ``train-student --kind sam-encoder`` (``--epochs``,
   ``--prompt-epochs``). On ``--test-images`` held-out images of seed 7001, every
   ground-truth object is prompted with its box and with one point (the object pixel
   nearest its centroid), decoded by the same decoder from the teacher's and the
   student's embeddings: mean IoU over objects of the student's masks vs the
   teacher's, and of both vs the ground truth; everything-mode recall (share of
   objects some proposal covers at IoU >= 0.5, ``--points-per-side``). Target: student
   box mIoU vs GT >= 0.9 x the teacher's.
3. **the loop**: ``embed`` the held-out images with the teacher and, into a new
   folder, with ``--sam-model OUT/students/NAME``; ``pseudolabel --rounds 0
   --background`` both; ``evaluate`` both against the ground truth (label mIoU).

    nice -n 15 .venv/bin/python bench/sam_student.py                          # defaults below
    nice -n 15 .venv/bin/python bench/sam_student.py --train-images 16 --test-images 8 --epochs 2 --speed-reps 0  # smoke
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

TRAIN_SEED, TEST_SEED = 7000, 7001


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=160)
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=16, help="distillation epochs (default 16)")
    parser.add_argument("--prompt-epochs", type=int, default=4, help="of which prompt-in-the-loop (default 4)")
    parser.add_argument("--width", type=int, default=64, help="student: channels of the stride-8 stage (64)")
    parser.add_argument("--depth", type=int, default=4, help="student: blocks of the stride-16 stage (4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--points-per-side", type=int, default=8, help="SAM everything-mode grid (default 8)")
    parser.add_argument("--speed-reps", type=int, default=2, help="timed ViT-B forwards (student: 5x); 0: skip")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine, 2 threads made a "
                        "training step 15x slower)")
    parser.add_argument("--workdir", default=None, help="keep everything here (default: a temp folder, deleted)")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def _speed(args) -> tuple[list[list], dict]:
    import torch

    from batchseg.models.sam import SAM_ARCHS, SamEncoder, build_sam_model
    from batchseg.students.edgesam import RepViTSamEncoder, SamStudentArch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"SAM ViT-B image encoder": SamEncoder(build_sam_model(SAM_ARCHS["vit_b"])).eval(),
              f"student (width {args.width}, depth {args.depth})":
                  RepViTSamEncoder(SamStudentArch(args.width, args.depth), 1024, 256, 64).eval()}
    x = torch.randn(1, 3, 1024, 1024)
    rows, found = [], {}
    for index, (name, model) in enumerate(models.items()):
        reps = args.speed_reps * (1 if index == 0 else 5)
        with torch.inference_mode():
            model(x)  # warm-up
            tick = time.perf_counter()
            for _ in range(reps):
                out = model(x)
            seconds = (time.perf_counter() - tick) / reps
        assert tuple(out.shape) == (1, 256, 64, 64)
        params = sum(p.numel() for p in model.parameters())
        found[name] = {"seconds": seconds, "parameters": params, "mb": params * 4 / 2**20}
        base = next(iter(found.values()))["seconds"]
        rows.append([name, f"{params / 1e6:.2f} M", f"{params * 4 / 2**20:.1f}", f"{seconds:.3f}",
                     f"{1 / seconds:.3f}", f"{base / seconds:.1f}x"])
        print(f"speed {name}: {seconds:.3f} s/image", flush=True)
    return rows, found


def _build(images: Path, out: Path, cluster, sam_model: str | None, vocab: Path, points: int) -> None:
    from batchseg.assets import TOY_CLIP_DIR, TOY_SAM_CHECKPOINT
    from batchseg.config import EmbedConfig, LabelSettings, ModelSettings, PseudolabelConfig
    from batchseg.labels.proposals import ProposalSettings
    from batchseg.labels.selftrain import SelfTrainSettings
    from batchseg.models.clip import ClipSpec
    from batchseg.models.sam import SamSpec
    from batchseg.models.text import MASKCLIP_TEMPLATES, load_vocab_file
    from batchseg.stages.embed import run_embed
    from batchseg.stages.pseudolabel import run_pseudolabel

    sam = SamSpec(sam_model) if sam_model else SamSpec("tiny", str(TOY_SAM_CHECKPOINT))
    models = ModelSettings(clip=ClipSpec(f"local-dir:{TOY_CLIP_DIR}"), sam=sam, precision="fp32")
    run_embed(EmbedConfig(source=images, out=out, models=models, cluster=cluster, shard_size=32), progress=False)
    labels = LabelSettings(vocabulary=load_vocab_file(vocab), templates=MASKCLIP_TEMPLATES, background=True,
                           proposals=ProposalSettings(points_per_side=points))
    run_pseudolabel(PseudolabelConfig(out=out, labels=labels, selftrain=SelfTrainSettings(), rounds=0,
                                      cluster=cluster, shard_size=32), progress=False)


def _train(out: Path, args, scheduler: str) -> Path:
    from click.testing import CliRunner

    from batchseg.cli import cli

    result = CliRunner().invoke(cli, [
        "train-student", str(out), "--kind", "sam-encoder", "--name", "fast-sam", "--epochs", str(args.epochs),
        "--prompt-epochs", str(args.prompt_epochs), "--width", str(args.width), "--depth", str(args.depth),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--threads", str(args.threads),
        "--scheduler", scheduler, "-q"], catch_exceptions=False)
    if result.exit_code:
        raise RuntimeError(result.output)
    return out / "students" / "fast-sam"


def _iou(a, b) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _quality(student_folder: Path, world: Path, points: int, threads: int) -> dict:
    """Prompted masks and everything-mode recall, teacher vs student embeddings, on the held-out images."""
    import numpy as np
    import torch

    from batchseg.assets import TOY_SAM_CHECKPOINT
    from batchseg.io.geometry import letterbox
    from batchseg.io.images import decode_image, read_image_bytes
    from batchseg.labels.proposals import ProposalSettings, generate_proposals
    from batchseg.labels.rle import decode_mask
    from batchseg.models.sam import SamEncoder, SamSpec, load_sam

    torch.set_num_threads(threads)
    teacher = load_sam(SamSpec("tiny", str(TOY_SAM_CHECKPOINT)))
    student = load_sam(SamSpec(str(student_folder)))
    encoders = {"teacher": SamEncoder(teacher), "student": SamEncoder(student)}
    coco = json.loads((world / "gt" / "instances.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    pairs = ("student-teacher", "teacher-gt", "student-gt")
    ious = {f"{prompt} {pair}": [] for prompt in ("box", "point") for pair in pairs}
    recall = {"teacher": [], "student": []}
    settings = ProposalSettings(points_per_side=points)
    for image_info in coco["images"]:
        pixels = decode_image(read_image_bytes(str(world / "images" / image_info["file_name"]))).pixels
        height, width = pixels.shape[:2]
        box = letterbox(height, width, teacher.image_encoder.img_size)
        sx, sy = box.valid_w / width, box.valid_h / height
        with torch.inference_mode():
            embeddings = {k: e(e.preprocess(pixels)[None]) for k, e in encoders.items()}
        gts = [decode_mask(a["segmentation"]) for a in by_image.get(image_info["id"], [])]
        prompts = []
        for gt, ann in zip(gts, by_image.get(image_info["id"], [])):
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(gt)
            nearest = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
            prompts.append((np.array([[x * sx, y * sy, (x + w) * sx, (y + h) * sy]], np.float32),
                            np.array([[[(xs[nearest] + 0.5) * sx, (ys[nearest] + 0.5) * sy]]], np.float32)))
        for gt, (box_prompt, point_prompt) in zip(gts, prompts):
            masks = {}
            for kind, embedding in embeddings.items():
                for prompt in ("box", "point"):
                    with torch.inference_mode():
                        if prompt == "box":
                            sparse, dense = teacher.prompt_encoder(points=None, boxes=torch.from_numpy(box_prompt),
                                                                   masks=None)
                        else:
                            sparse, dense = teacher.prompt_encoder(
                                points=(torch.from_numpy(point_prompt), torch.ones(1, 1, dtype=torch.int64)),
                                boxes=None, masks=None)
                        low, iou = teacher.mask_decoder(image_embeddings=embedding,
                                                        image_pe=teacher.prompt_encoder.get_dense_pe(),
                                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                        multimask_output=prompt == "point")
                        low = low[:, int(iou.argmax())][:, None]
                        full = teacher.postprocess_masks(low, (box.valid_h, box.valid_w), (height, width))
                    masks[kind, prompt] = full[0, 0].numpy() > 0
            for prompt in ("box", "point"):
                ious[f"{prompt} student-teacher"].append(_iou(masks["student", prompt], masks["teacher", prompt]))
                ious[f"{prompt} teacher-gt"].append(_iou(masks["teacher", prompt], gt))
                ious[f"{prompt} student-gt"].append(_iou(masks["student", prompt], gt))
        for kind, embedding in embeddings.items():
            proposals = generate_proposals(teacher, embedding[0], (height, width), settings)
            for gt in gts:
                best = max((_iou(m, gt) for m in proposals.masks), default=0.0)
                recall[kind].append(best >= 0.5)
    return {"miou": {k: float(np.mean(v)) for k, v in ious.items()}, "objects": len(ious["box teacher-gt"]),
            "recall": {k: float(np.mean(v)) for k, v in recall.items()}}


def _label_miou(out: Path, gt: Path) -> dict[str, float]:
    from batchseg.stages.evaluate import EvaluateConfig, run_evaluate

    report = run_evaluate(EvaluateConfig(out=out, gt=gt))
    return {r.source: r.scores.miou for r in report.results if r.round == 0}


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    from distributed import Client, LocalCluster

    from batchseg.config import ClusterSettings
    from batchseg.world import write_world

    folder, created = common.workdir(args.workdir, "bench-sam-student-")
    results: dict = {"args": vars(args)}
    try:
        print("\n".join(common.machine_lines()), flush=True)
        speed_rows = []
        if args.speed_reps:
            speed_rows, results["speed"] = _speed(args)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.CRITICAL, env=common.thread_env(args.threads),
                          local_directory=str(folder / "dask")) as cluster, Client(cluster):
            scheduler = cluster.scheduler_address
            external = ClusterSettings(scheduler=scheduler, torch_threads=args.threads)
            worlds = {}
            for name, seed, count in (("train", TRAIN_SEED, args.train_images), ("test", TEST_SEED, args.test_images)):
                worlds[name] = folder / f"world-{name}"
                if not (worlds[name] / "images").exists():
                    write_world(worlds[name], count, seed=seed)
            vocab = worlds["train"] / "classes.txt"
            tick = time.perf_counter()
            teacher_train = folder / "build-train"
            if not (teacher_train / "labels").exists():
                _build(worlds["train"] / "images", teacher_train, external, None, vocab, args.points_per_side)
            print(f"teacher build of {args.train_images} train images: {time.perf_counter() - tick:.0f} s", flush=True)
            tick = time.perf_counter()
            student = _train(teacher_train, args, scheduler)
            train_seconds = time.perf_counter() - tick
            config = json.loads((student / "config.json").read_text())
            import pyarrow.dataset as ds

            losses = ds.dataset(student / "metrics", format="parquet").to_table().sort_by("epoch").column("loss").to_pylist()
            results["train"] = {"seconds": train_seconds, "losses": losses, "parameters": config["parameters"],
                                "size_mb": config["size_mb"]}
            print(f"distilled in {train_seconds:.0f} s; losses {[round(v, 4) for v in losses]}", flush=True)

            tick = time.perf_counter()
            quality = _quality(student, worlds["test"], args.points_per_side, args.threads)
            results["quality"] = quality
            print(f"mask quality: {time.perf_counter() - tick:.0f} s", flush=True)

            loop = {}
            for name, sam_model in (("teacher", None), ("student", str(student))):
                out = folder / f"build-test-{name}"
                shutil.rmtree(out, ignore_errors=True)
                tick = time.perf_counter()
                _build(worlds["test"] / "images", out, external, sam_model, vocab, args.points_per_side)
                loop[name] = {**_label_miou(out, worlds["test"] / "gt"), "seconds": time.perf_counter() - tick}
            results["loop"] = loop

        if speed_rows:
            print(f"\nspeed: image encoder alone, 1024x1024 canvas, batch 1, fp32, {args.threads} thread(s)")
            print(common.table(["encoder", "parameters", "MB (fp32)", "s/image", "images/s", "speed-up"], speed_rows))
        miou = quality["miou"]
        print(f"\nmask quality: {quality['objects']} objects of {args.test_images} held-out world images (seed "
              f"{TEST_SEED}); student distilled {args.epochs} epochs ({args.epochs - args.prompt_epochs} encoder-only + "
              f"{args.prompt_epochs} prompt-in-the-loop) from {args.train_images} images (seed {TRAIN_SEED}) in "
              f"{train_seconds:.0f} s; {config['parameters'] / 1e6:.2f} M parameters; folder {config['size_mb']:.2f} MB")
        rows = []
        for prompt in ("box", "point"):
            t, s = miou[f"{prompt} teacher-gt"], miou[f"{prompt} student-gt"]
            rows.append([prompt, f"{100 * miou[f'{prompt} student-teacher']:.1f}", f"{100 * t:.1f}", f"{100 * s:.1f}",
                         f"{s / t:.3f}" if t else "n/a"])
        recall = quality["recall"]
        rows.append([f"everything mode ({args.points_per_side}x{args.points_per_side}), recall @ IoU 0.5", "-",
                     f"{100 * recall['teacher']:.1f}", f"{100 * recall['student']:.1f}",
                     f"{recall['student'] / recall['teacher']:.3f}" if recall["teacher"] else "n/a"])
        print(common.table(["prompt", "mIoU student vs teacher", "teacher vs GT", "student vs GT",
                            "student / teacher"], rows))
        print(f"\nthe loop: embed + pseudolabel --rounds 0 --background on the {args.test_images} held-out images; "
              "label mIoU (%) against the ground truth")
        loop_rows = [[f"{name}'s embeddings", *(f"{100 * loop[name].get(src, float('nan')):.1f}"
                                                for src in ("maskclip", "sam")), f"{loop[name]['seconds']:.0f}"]
                     for name in ("teacher", "student")]
        print(common.table(["SAM", "maskclip labels", "sam labels (written)", "embed + label s"], loop_rows))
        print(common.load_line())
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
