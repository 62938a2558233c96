"""A labelled build written directly from the synthetic world's ground truth (test support).

No models run: the manifest, label rounds, ``_round.json`` statistics, an evaluation
and the embed run record are written as the stages would write them, with the
world's exact masks as labels. Export and report tests and benchmarks read it, and
can compare what they write with the truth.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchseg.config import BUILD_FILE, BUILD_SCHEMA_VERSION
from batchseg.io.files import write_json_atomic
from batchseg.io.images import content_id
from batchseg.io.statuses import ImageStatus, LabelKind, LabelSource
from batchseg.io.tables import labels_table, manifest_table, round_folder, write_part_atomic
from batchseg.labels.rle import encode_label_map, encode_mask, rle_area, rle_bbox_xywh
from batchseg.world import CLASS_NAMES, render_sample, semantic_to_class_ids, write_world

RUN_ID = "20260101T000000Z-000000"


@dataclass(frozen=True)
class LabelledBuild:
    out: Path  # the build folder
    images: Path  # the source folder the build was "embedded" from
    world: Path  # write_world's folder (images/, gt/, classes.txt)
    seed: int
    count: int
    rounds: int


def _row(image_id: str, kind: str, segment: int, class_id: int, score: float, source: str, round_index: int,
         rle: dict) -> dict:
    return {
        "image_id": image_id, "kind": kind, "segment_id": segment, "class_id": class_id,
        "class_name": CLASS_NAMES[class_id], "score": score, "source": source, "round": round_index,
        "bbox": list(rle_bbox_xywh(rle)), "area": rle_area(rle), "mask": rle,
    }


def image_rows(seed: int, index: int, image_id: str, round_index: int) -> list[dict]:
    """Label rows of one world sample: its true semantic map (sources maskclip or student,
    and sam) and one instance row per object (sam); scores from a seeded generator."""
    sample = render_sample(seed, index)
    rng = np.random.default_rng([seed, index, round_index])
    label = semantic_to_class_ids(sample.semantic)
    semantic = encode_label_map(label, ignore=-1)
    first = LabelSource.MASKCLIP if round_index == 0 else LabelSource.STUDENT
    rows = []
    for source in (first, LabelSource.SAM):
        for class_id, rle in semantic:
            rows.append(_row(image_id, LabelKind.SEMANTIC, class_id, class_id, float(rng.uniform(0.3, 1.0)), source,
                             round_index, rle))
    for segment, obj in enumerate(sample.objects):
        rows.append(_row(image_id, LabelKind.INSTANCE, segment, obj.class_id, float(rng.uniform(0.3, 1.0)), LabelSource.SAM,
                         round_index, encode_mask(obj.mask)))
    return rows


def write_labelled_build(root: Path, count: int, seed: int = 0, rounds: int = 1, shard_size: int = 4,
                         evaluation: bool = True) -> LabelledBuild:
    """Write ``count`` world images and a build in ``root/out`` labelled with their truth.

    Rounds ``0..rounds``; one label part per ``shard_size`` images; the manifest also
    holds a duplicate file and a truncated one, as real builds do.
    """
    world = root / "world"
    paths = write_world(world, count, seed)
    out = root / "out"
    manifest, ids = [], []
    for zarr_row, path in enumerate(paths):
        image_id = content_id(path.read_bytes())
        ids.append(image_id)
        sample_h, sample_w = render_sample(seed, zarr_row).semantic.shape
        manifest.append({"image_id": image_id, "path": path.name, "bytes": path.stat().st_size, "width": sample_w,
                         "height": sample_h, "status": ImageStatus.OK, "zarr_row": zarr_row, "shard": f"{RUN_ID}-00000",
                         "run_id": RUN_ID})
    (paths[0].parent / "copies").mkdir(exist_ok=True)
    (paths[0].parent / "copies" / paths[0].name).write_bytes(paths[0].read_bytes())
    manifest.append({"image_id": ids[0], "path": "copies/" + paths[0].name, "status": ImageStatus.DUPLICATE, "run_id": RUN_ID,
                     "error": f"same content as {paths[0].name}; computed once"})
    manifest.append({"image_id": None, "path": "broken.jpg", "status": ImageStatus.TRUNCATED, "run_id": RUN_ID,
                     "error": "image file is truncated"})
    write_part_atomic(manifest_table(manifest), out / "manifest" / f"part-{RUN_ID}-00000.parquet")
    write_json_atomic(out / BUILD_FILE, {"schema_version": BUILD_SCHEMA_VERSION,
                                          "pseudolabel": {"labels": {"classes": list(CLASS_NAMES)}}})
    for round_index in range(rounds + 1):
        histogram = np.zeros(len(CLASS_NAMES), dtype=np.int64)
        for shard, start in enumerate(range(0, count, shard_size)):
            rows = []
            for index in range(start, min(count, start + shard_size)):
                rows += image_rows(seed, index, ids[index], round_index)
            for row in rows:
                if row["kind"] == LabelKind.SEMANTIC and row["source"] == LabelSource.SAM:
                    histogram[row["class_id"]] += row["area"]
            write_part_atomic(labels_table(rows), round_folder(out, round_index) / f"part-{RUN_ID}-{shard:05d}.parquet")
        write_json_atomic(round_folder(out, round_index) / "_round.json", {
            "round": round_index, "images": count, "run_id": RUN_ID,
            "stats": {
                "class_histogram": {name: int(n) for name, n in zip(CLASS_NAMES, histogram)},
                "mean_confidence": 0.62 + 0.05 * round_index,
                "labelled_cells": int(histogram.sum()),
                "agreement_with_previous": None if round_index == 0 else 0.9,
            },
        })
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(runs / f"{RUN_ID}.json", {
        "run_id": RUN_ID, "command": "embed", "status": "finished",
        "config": {"source": str(world / "images")}, "finished_at": dt.datetime(2026, 1, 1).isoformat(),
        "counts": {"found": count + 2, "ok": count, "failed": 1, "duplicates": 1},
    })
    if evaluation:
        _write_evaluation(out, rounds)
    return LabelledBuild(out, world / "images", world, seed, count, rounds)


def _write_evaluation(out: Path, rounds: int) -> None:
    """An evaluate JSON as `batchseg evaluate` writes it (perfect labels: IoU 1 where present)."""
    results = []
    for round_index in range(rounds + 1):
        for source in (LabelSource.MASKCLIP if round_index == 0 else LabelSource.STUDENT, LabelSource.SAM):
            iou = 1.0 - 0.1 / (round_index + 1) if source != LabelSource.SAM else 1.0
            results.append({
                "round": round_index, "source": source, "images": 4, "miou": iou, "pixel_accuracy": iou,
                "per_class": [{"class_id": k, "class_name": n, "iou": iou if k % 3 else None}
                              for k, n in enumerate(CLASS_NAMES)],
            })
    folder = out / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_20260101T000001Z-abcdef.json").write_text(json.dumps({
        "schema": "eval", "schema_version": 1, "eval_id": "20260101T000001Z-abcdef",
        "created": "2026-01-01T00:00:01+00:00", "gt": "gt/", "gt_format": "png",
        "classes": list(CLASS_NAMES), "results": results,
    }))
