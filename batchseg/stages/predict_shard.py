"""The worker side of `predict`: one shard of images to label rows and a committed manifest part.

The label part is written first, the manifest part last (by rename, the commit
marker); a label part whose manifest part is missing belongs to a crashed shard and
the driver deletes it before the next run plans, so a rerun never duplicates rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from batchseg.io.images import ImageError, content_id, decode_image, read_image_bytes
from batchseg.io.statuses import ImageStatus, StudentKind
from batchseg.io.tables import labels_table, manifest_table, round_folder, write_part_atomic
from batchseg.stages.embed_plan import part_path

LABEL_ROUND = 0  # a student's predictions are one round of labels


@dataclass(frozen=True)
class PredictItem:
    image_id: str
    path: str | bytes
    rel_path: str
    size: int | None
    mtime: float | None


@dataclass(frozen=True)
class PredictShard:
    shard_id: str
    run_id: str
    dest: Path
    student: Path
    items: tuple[PredictItem, ...]
    batch_size: int = 8
    max_pixels: int = 178_956_970
    torch_threads: int | None = None


@dataclass(frozen=True)
class PredictShardResult:
    shard_id: str
    images: int
    ok: int
    rows: int
    seconds: float
    already_committed: bool = False


def label_part_path(dest: Path, shard_id: str) -> Path:
    return round_folder(dest, LABEL_ROUND) / f"part-{shard_id}.parquet"


def _row(task: PredictShard, item: PredictItem) -> dict:
    return {"image_id": item.image_id, "path": item.rel_path, "bytes": item.size, "mtime": item.mtime,
            "status": ImageStatus.OK, "error": None, "zarr_row": None, "shard": task.shard_id, "run_id": task.run_id}


def run_predict_shard(task: PredictShard) -> PredictShardResult:
    """Label one shard of images with the student and commit it; safe to run again."""
    # Here, not at the top: the driver imports this module to plan, and torch takes seconds.
    import torch

    from batchseg.models import runtime
    from batchseg.models.runtime import set_torch_threads
    from batchseg.students.load import cached_student
    from batchseg.students.predict import (
        instance_label_rows, instance_outputs, prepare, semantic_label_rows, semantic_probs,
    )

    start = time.perf_counter()
    if part_path(task.dest, task.shard_id).exists():
        return PredictShardResult(task.shard_id, len(task.items), 0, 0, 0.0, already_committed=True)
    set_torch_threads(task.torch_threads)
    student = cached_student(task.student, runtime.worker_device())
    manifest_rows, label_rows = [], []
    batch: list[tuple[dict, torch.Tensor, tuple[int, int]]] = []

    def flush() -> None:
        if not batch:
            return
        pixels = torch.stack([pixels for _, pixels, _ in batch])
        if student.kind == StudentKind.INSTANCE:
            outputs = instance_outputs(student, pixels)
            for index, (row, _, valid) in enumerate(batch):
                label_rows.extend(instance_label_rows(student, outputs, index, row["image_id"], row["height"],
                                                      row["width"], valid, LABEL_ROUND))
        else:
            probs = semantic_probs(student, pixels)
            for (row, _, valid), image_probs in zip(batch, probs):
                label_rows.extend(semantic_label_rows(student, image_probs, row["image_id"], row["height"],
                                                      row["width"], valid, LABEL_ROUND))
        batch.clear()

    for item in task.items:
        row = _row(task, item)
        manifest_rows.append(row)
        try:
            data = read_image_bytes(item.path)
            image = decode_image(data, max_pixels=task.max_pixels) if content_id(data) == item.image_id else None
        except ImageError as exc:
            row.update(status=exc.status, error=exc.message)
            continue
        if image is None:
            row.update(status=ImageStatus.CHANGED, error="file changed after it was hashed; the next run will pick up the new content")
            continue
        row.update(width=image.width, height=image.height, frames=image.frames)
        pixels, valid = prepare(image.pixels, student.input_size)
        batch.append((row, pixels, valid))
        if len(batch) == task.batch_size:
            flush()
    flush()
    write_part_atomic(labels_table(label_rows), label_part_path(task.dest, task.shard_id))
    write_part_atomic(manifest_table(manifest_rows), part_path(task.dest, task.shard_id))
    ok = sum(row["status"] == ImageStatus.OK for row in manifest_rows)
    return PredictShardResult(task.shard_id, len(manifest_rows), ok, len(label_rows), time.perf_counter() - start)
