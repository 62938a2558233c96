"""The worker side of `embed`: one shard of images to Zarr rows and a committed manifest part.

A shard task is idempotent (DESIGN rule 1): it writes only its own rows, and its
manifest part, written last by rename, is the commit marker. Running it twice (a
worker died, Dask retried) writes the same bytes again.

Inside a shard, decoding (threads, Pillow releases the GIL), model forward passes and
Zarr writes (threads, zstd releases the GIL) overlap through bounded queues.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from batchseg.io.statuses import ImageStatus
from batchseg.models.specs import ModelSettings
from batchseg.io.geometry import letterbox
from batchseg.io.images import ImageError, content_id, decode_image, read_image_bytes
from batchseg.io.store import FINE_CLS, FINE_TOKENS, RowWriter
from batchseg.io.tables import manifest_table, write_part_atomic
from batchseg.models.clip import preprocess_clip
from batchseg.models.runtime import LoadedModels, ModelBuilders, get_models, set_torch_threads
from batchseg.stages.embed_plan import CURRENT_RUN_FILE, ShardItem, part_path  # noqa: F401  (planning types; re-exported)


@dataclass(frozen=True)
class ShardTask:
    shard_id: str
    run_id: str
    out: Path
    items: tuple[ShardItem, ...]
    models: ModelSettings
    builders: ModelBuilders = field(default_factory=ModelBuilders)
    batch_size: int = 8
    max_pixels: int = 178_956_970
    torch_threads: int | None = None
    decode_threads: int = 2


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    images: int
    ok: int
    failed: int
    compute_seconds: float
    seconds: float
    already_committed: bool = False


@dataclass
class _Prepared:
    item: ShardItem
    row: dict
    clip_pixels: torch.Tensor | None = None
    clip_fine_pixels: torch.Tensor | None = None
    sam_pixels: torch.Tensor | None = None


class StaleRunError(RuntimeError):
    """This task belongs to a run that is no longer the build's current run."""


def _check_current(task: ShardTask) -> None:
    # An orphaned worker of a killed run must not write into rows that the next run
    # has handed to other images.
    marker = task.out / CURRENT_RUN_FILE
    current = marker.read_text().strip() if marker.exists() else None
    if current != task.run_id:
        raise StaleRunError(f"shard {task.shard_id} belongs to run {task.run_id}, the build's current run is {current}")


def _base_row(task: ShardTask, item: ShardItem) -> dict:
    return {
        "image_id": item.image_id,
        "path": item.rel_path,
        "bytes": item.size,
        "mtime": item.mtime,
        "status": ImageStatus.OK,
        "error": None,
        "zarr_row": item.zarr_row,
        "shard": task.shard_id,
        "run_id": task.run_id,
    }


def _prepare(task: ShardTask, models: LoadedModels, item: ShardItem) -> _Prepared:
    """Read, verify, decode and preprocess one image; failures become the row's status."""
    row = _base_row(task, item)
    try:
        data = read_image_bytes(item.path)
        if content_id(data) != item.image_id:
            raise ImageError(ImageStatus.CHANGED, "file changed after it was hashed; the next run will pick up the new content")
        image = decode_image(data, max_pixels=task.max_pixels)
    except ImageError as exc:
        row.update(status=exc.status, error=exc.message, zarr_row=None)
        return _Prepared(item=item, row=row)
    row.update(width=image.width, height=image.height, frames=image.frames)
    prepared = _Prepared(item=item, row=row)
    if item.reuse:  # the manifest row needs the geometry; the stored embeddings are kept
        if models.clip is not None:
            box = letterbox(image.height, image.width, models.clip.canvas)
            row.update(clip_valid_h=box.valid_h, clip_valid_w=box.valid_w)
        if models.sam is not None:
            box = letterbox(image.height, image.width, models.sam.image_size)
            row.update(sam_valid_h=box.valid_h, sam_valid_w=box.valid_w)
        return prepared
    if models.clip is not None:
        clip = models.clip
        box = letterbox(image.height, image.width, clip.canvas)
        row.update(clip_valid_h=box.valid_h, clip_valid_w=box.valid_w)
        pp = clip.preprocess  # the model's own preprocess_cfg: filter, mean, std, letterbox fill
        prepared.clip_pixels = preprocess_clip(image.pixels, clip.canvas, pp.mean, pp.std,
                                               interpolation=pp.interpolation, fill=pp.fill)
        if models.clip_fine is not None:  # resized from the decoded image, never from the smaller canvas
            prepared.clip_fine_pixels = preprocess_clip(image.pixels, models.clip_fine.canvas, pp.mean, pp.std,
                                                        interpolation=pp.interpolation, fill=pp.fill)
    if models.sam is not None:
        box = letterbox(image.height, image.width, models.sam.image_size)
        row.update(sam_valid_h=box.valid_h, sam_valid_w=box.valid_w)
        prepared.sam_pixels = models.sam.preprocess(image.pixels)
    return prepared


def _prefetch(pool: ThreadPoolExecutor, task: ShardTask, models: LoadedModels, depth: int) -> Iterator[_Prepared]:
    """Decode ahead of the model by ``depth`` images, in order, with bounded memory."""
    pending: deque[Future] = deque()
    items = iter(task.items)
    for item in items:
        pending.append(pool.submit(_prepare, task, models, item))
        if len(pending) >= depth:
            break
    while pending:
        yield pending.popleft().result()
        nxt = next(items, None)
        if nxt is not None:
            pending.append(pool.submit(_prepare, task, models, nxt))


def _batches(prepared: Iterator[_Prepared], size: int) -> Iterator[list[_Prepared]]:
    """Group decodable images into batches; failed ones pass straight through."""
    batch: list[_Prepared] = []
    for entry in prepared:
        if entry.row["status"] != ImageStatus.OK or entry.item.reuse:
            yield [entry]
            continue
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _forward(models: LoadedModels, batch: list[_Prepared]) -> dict[str, np.ndarray]:
    """Run the models on one batch; returns arrays by store name, (B, ...) float16."""
    outputs: dict[str, np.ndarray] = {}
    device = models.device
    with torch.inference_mode():
        if models.clip is not None:
            pixels = torch.stack([entry.clip_pixels for entry in batch]).to(device, models.dtype, non_blocking=True)
            result = models.clip.encode_tokens(pixels)
            outputs["clip_tokens"] = result.tokens
            if result.cls is not None:
                outputs["clip_cls"] = result.cls
            outputs["clip_global"] = result.global_
        if models.clip_fine is not None:
            pixels = torch.stack([entry.clip_fine_pixels for entry in batch]).to(device, models.dtype, non_blocking=True)
            fine = models.clip_fine.encode_tokens(pixels)
            outputs[FINE_TOKENS] = fine.tokens
            if fine.cls is not None:
                outputs[FINE_CLS] = fine.cls
        if models.sam is not None:
            pixels = torch.stack([entry.sam_pixels for entry in batch]).to(device, models.dtype, non_blocking=True)
            outputs["sam"] = models.sam(pixels)
    return {name: value.float().half().cpu().numpy() for name, value in outputs.items()}


def _write_rows(writer: RowWriter, batch: list[_Prepared], outputs: dict[str, np.ndarray]) -> None:
    for index, entry in enumerate(batch):
        for name, values in outputs.items():
            writer.write(name, entry.item.zarr_row, values[index])
        writer.write_owner(entry.item.zarr_row, entry.item.image_id)


def run_shard(task: ShardTask, builders: ModelBuilders | None = None) -> ShardResult:
    """Compute one shard and commit it. Safe to run again after a crash at any point."""
    start = time.perf_counter()
    if part_path(task.out, task.shard_id).exists():
        # Dask retried a task whose first attempt had already committed. (A stat, not a
        # directory listing: a listing per task grows with the whole build.)
        return ShardResult(task.shard_id, len(task.items), 0, 0, 0.0, 0.0, already_committed=True)
    _check_current(task)
    set_torch_threads(task.torch_threads)
    models = get_models(task.models, builders or task.builders)
    writer = RowWriter(task.out)
    rows: list[dict] = []
    compute = 0.0
    write_futures: deque[Future] = deque()
    with ThreadPoolExecutor(task.decode_threads, thread_name_prefix="decode") as decoders, ThreadPoolExecutor(
        1, thread_name_prefix="zarr-write"
    ) as writers:
        depth = max(2 * task.batch_size, task.decode_threads)
        for batch in _batches(_prefetch(decoders, task, models, depth), task.batch_size):
            rows.extend(entry.row for entry in batch)
            if batch[0].row["status"] != ImageStatus.OK or batch[0].item.reuse:
                continue
            tick = time.perf_counter()
            outputs = _forward(models, batch)
            compute += time.perf_counter() - tick
            # Bound the write queue so a slow disk back-pressures compute, not memory.
            while len(write_futures) > 2:
                write_futures.popleft().result()
            write_futures.append(writers.submit(_write_rows, writer, batch, outputs))
        for future in write_futures:
            future.result()
    _check_current(task)
    order = {item.rel_path: index for index, item in enumerate(task.items)}
    rows.sort(key=lambda row: order[row["path"]])
    write_part_atomic(manifest_table(rows), part_path(task.out, task.shard_id))
    ok = sum(row["status"] == ImageStatus.OK for row in rows)
    return ShardResult(task.shard_id, len(rows), ok, len(rows) - ok, compute, time.perf_counter() - start)
