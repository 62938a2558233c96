"""The worker side of `pseudolabel`: one shard of images to label rows and training targets.

Reads only stored embeddings (no image is re-encoded by the big models). Like
`embed`, a shard writes its own rows of the round's target grid first and commits
its Parquet part last, by rename; running it twice writes the same bytes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from batchseg.config import LabelSettings
from batchseg.io.statuses import LabelKind, LabelSource
from batchseg.models.specs import ModelSettings
from batchseg.io.grid_store import TargetGridWriter
from batchseg.io.geometry import letterbox
from batchseg.io.store import FINE_CLS, FINE_TOKENS, CheckedRowReader, ModelGeometry
from batchseg.io.store_integrity import DamagedRowError
from batchseg.io.tables import labels_table, round_folder, write_part_atomic
from batchseg.labels.image_labels import (
    ImageFrame,
    grid_probs_to_work,
    grid_targets,
    instance_rows,
    label_and_confidence,
    mask_vote_confidence,
    semantic_rows,
)
from batchseg.labels.maskclip import fuse_canvases, maskclip_probs
from batchseg.labels.proposals import generate_proposals
from batchseg.labels.recognise import majority_classes, recognise_masks, refine_semantic
from batchseg.labels.rle import decode_mask
from batchseg.labels.selftrain import SegHead, load_head, predict_probs
from batchseg.models.clip import ClipSpec, DenseClip
from batchseg.models.dense_heads import compute_head
from batchseg.models import runtime
from batchseg.models.runtime import ModelBuilders, get_models
from batchseg.models.sam import SamSpec, load_sam
from batchseg.models.vocabulary import Vocabulary, classifier_file, load_classifier
from batchseg.stages.pseudolabel_plan import LabelImage  # noqa: F401  (planning types; re-exported)


@dataclass(frozen=True)
class RoundContext:
    """What every shard of one round shares."""

    out: Path
    round_index: int
    names: tuple[str, ...]
    classifier_path: Path  # OUT/text/<key>.safetensors: (C, D) float32 unit rows; each worker loads it once
    settings: LabelSettings
    geometry: ModelGeometry
    use_sam: bool
    sam_spec: SamSpec | None
    clip_spec: ClipSpec | None = None  # the build's CLIP: its last block computes the dense head
    head_path: Path | None = None  # the round's trained head (rounds >= 1)
    # Earlier rounds' heads whose probabilities are averaged with this round's (SelfTrainSettings.ensemble)
    earlier_heads: tuple[Path, ...] = ()

    @property
    def head_grid(self) -> tuple[int, int]:
        """(grid, canvas) of the training targets: SAM's grid when SAM is used, else CLIP's."""
        if self.use_sam:
            return self.geometry.sam_embed_shape[1], self.geometry.sam_image_size
        return self.geometry.clip_grid, self.geometry.clip_canvas

    @property
    def dense_on_sam_grid(self) -> bool:
        """The dense head's output lies on SAM's grid (proxy-sam), not CLIP's."""
        return self.settings.dense_head.needs_sam

    @property
    def fuses_fine(self) -> bool:
        """Round 0 averages in the logits of the fine canvas's stored tokens (embed --fine-canvas).
        Not for proxy-sam, whose output already lies on SAM's finer grid."""
        return self.geometry.has_fine and self.settings.fine_weight > 0 and not self.dense_on_sam_grid


@dataclass(frozen=True)
class LabelShard:
    shard_id: str
    images: tuple[LabelImage, ...]
    sam_mask_parts: tuple[str, ...] = ()  # round-0 parts holding these images' SAM masks


@dataclass(frozen=True)
class LabelShardResult:
    shard_id: str
    images: int
    rows: int
    seconds: float
    already_committed: bool = False
    damaged: tuple[tuple[str, str], ...] = ()  # (image id, why) of images not labelled: damaged stored rows


def label_part_path(out: Path, round_index: int, shard_id: str) -> Path:
    return round_folder(out, round_index) / f"part-{shard_id}.parquet"


# Per worker process, keyed by the device too: what one device loaded is never handed to another.
_SAM_CACHE: dict[tuple[SamSpec, str], torch.nn.Module] = {}
_HEAD_CACHE: dict[tuple[str, float, str], SegHead] = {}
_CLASSIFIER_CACHE: dict[tuple[str, float, str], torch.Tensor] = {}
_LOCK = threading.Lock()


def store_text_classifier(out: Path, spec: ClipSpec, vocab: Vocabulary, templates: tuple[str, ...]) -> Path:
    """Compute the build's text classifier on this worker's device (the text tower runs once
    per build, vocabulary and templates) and store it; its file."""
    from batchseg.labels.text_cache import text_classifier

    _, key = text_classifier(out, spec, vocab, templates, device=runtime.worker_device())
    return classifier_file(out, key)


def worker_classifier(ctx: RoundContext) -> torch.Tensor:
    """The round's text classifier on the worker's device, loaded once per worker."""
    device = runtime.worker_device()
    key = (str(ctx.classifier_path), ctx.classifier_path.stat().st_mtime, device)
    with _LOCK:
        if key not in _CLASSIFIER_CACHE:
            _CLASSIFIER_CACHE.clear()
            _CLASSIFIER_CACHE[key] = load_classifier(ctx.classifier_path).to(device)
        return _CLASSIFIER_CACHE[key]


def _clip(ctx: RoundContext) -> DenseClip:
    """The build's CLIP on the worker's device, loaded once per worker (float32: heads are
    cheap, and exact)."""
    settings = ModelSettings(clip=ctx.clip_spec, sam=None, clip_canvas=ctx.geometry.clip_canvas, precision="fp32")
    return get_models(settings, ModelBuilders(), device=runtime.worker_device()).clip


def stored_rows(store: CheckedRowReader, name: str, rows: list[int]) -> torch.Tensor:
    """Stored rows of one array, each checked (``DamagedRowError`` for a missing or damaged chunk)."""
    return torch.from_numpy(np.stack([store.read(name, int(r)) for r in rows]))


def device_head_features(ctx: RoundContext, store: CheckedRowReader, rows: list[int], with_keys: bool = False,
                         fine: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chosen dense head on stored tokens of ``rows`` (those of the fine canvas when
    ``fine``), on the worker's device: float32 (B, D, h, w) and keys (B, K, h, w)."""
    tokens_name, cls_name = (FINE_TOKENS, FINE_CLS) if fine else ("clip_tokens", "clip_cls")
    tokens = stored_rows(store, tokens_name, rows)
    cls = stored_rows(store, cls_name, rows) if cls_name in store else None
    sam = stored_rows(store, "sam", rows) if ctx.dense_on_sam_grid else None
    clip = _clip(ctx)
    device = next(clip.parameters()).device
    tokens, cls, sam = (None if t is None else t.to(device) for t in (tokens, cls, sam))
    out = compute_head(clip, ctx.settings.dense_head, tokens, cls, sam)
    return out.dense, (out.keys if with_keys else None)


def head_features(ctx: RoundContext, store: CheckedRowReader, rows: list[int], with_keys: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`device_head_features` brought back to the CPU (where training caches them)."""
    dense, keys = device_head_features(ctx, store, rows, with_keys)
    return dense.cpu(), (keys.cpu() if keys is not None else None)


def _sam(spec: SamSpec) -> torch.nn.Module:
    key = (spec, runtime.worker_device())
    with _LOCK:
        if key not in _SAM_CACHE:
            _SAM_CACHE.clear()
            _SAM_CACHE[key] = load_sam(spec, device=key[1]).eval()
        return _SAM_CACHE[key]


def _heads(ctx: RoundContext) -> list[SegHead]:
    """This round's head and the earlier rounds' it averages with, on the worker's device,
    loaded once per worker and round."""
    device = runtime.worker_device()
    paths = (*ctx.earlier_heads, ctx.head_path)
    keys = [(str(path), path.stat().st_mtime, device) for path in paths]
    classifier = worker_classifier(ctx)
    with _LOCK:
        if set(keys) != set(_HEAD_CACHE):
            _HEAD_CACHE.clear()
            for key, path in zip(keys, paths):
                _HEAD_CACHE[key] = load_head(path, classifier).to(device).eval()
        return [_HEAD_CACHE[key] for key in keys]


def ensemble_probs(heads: list[SegHead], sam: torch.Tensor | None, clip: torch.Tensor) -> torch.Tensor:
    """Mean of the heads' class probabilities: float32 ``(B, C, G, G)``, summing to 1 over C.

    Each round's head re-fits its targets with its own noise; averaging the rounds'
    heads (a temporal ensemble) keeps what they agree on."""
    probs = predict_probs(heads[0], sam, clip)
    for head in heads[1:]:
        probs = probs + predict_probs(head, sam, clip)
    return probs / len(heads)


def _frame(ctx: RoundContext, image: LabelImage) -> ImageFrame:
    return ImageFrame.create(image.image_id, image.height, image.width, ctx.settings.work_max_side)


def _valid(ctx: RoundContext, image: LabelImage, sam_canvas: bool | None = None) -> tuple[int, int]:
    if ctx.use_sam if sam_canvas is None else sam_canvas:
        return image.sam_valid_h, image.sam_valid_w
    return image.clip_valid_h, image.clip_valid_w


def _dense_canvas(ctx: RoundContext) -> int:
    return ctx.geometry.sam_image_size if ctx.dense_on_sam_grid else ctx.geometry.clip_canvas


def _painting_classes(ctx: RoundContext, class_ids: np.ndarray) -> np.ndarray:
    """The class each mask paints in the vote: its own, or -1 (paints nothing) for a mask
    recognised as background unless ``bg_mask_vote`` (the instance rows keep its class)."""
    if ctx.settings.bg_mask_vote or not ctx.settings.background:
        return class_ids
    background = len(ctx.names) - 1  # LabelSettings.class_names puts "background" last
    return np.where(class_ids == background, -1, class_ids)


def _refine_with_masks(ctx: RoundContext, frame: ImageFrame, probs: torch.Tensor, label: np.ndarray,
                       confidence: np.ndarray, masks: np.ndarray) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Recognise SAM masks with ``probs`` and let them vote the semantic map."""
    if masks.shape[0] == 0:
        rows = semantic_rows(frame, label, confidence, ctx.names, LabelSource.SAM, ctx.round_index)
        return rows, label, confidence
    mask_tensor = torch.from_numpy(masks)
    if ctx.settings.region_vote == "majority":
        class_ids, scores = majority_classes(torch.from_numpy(label), mask_tensor, probs.shape[0])
    else:
        class_ids, scores = recognise_masks(probs, mask_tensor)
    class_ids, scores = class_ids.numpy(), scores.numpy()
    voted = class_ids >= 0  # a mask over unlabelled pixels only (bg floor) has no class
    rows = instance_rows(frame, masks[voted], class_ids[voted], scores[voted], ctx.names, LabelSource.SAM,
                         ctx.round_index)
    painting = _painting_classes(ctx, class_ids)
    refined = refine_semantic(probs, mask_tensor, torch.from_numpy(scores),
                              class_ids=torch.from_numpy(painting)).numpy().astype(np.int64)
    if ctx.settings.bg_floor is not None:
        # Pixels no mask covers keep the floor's "unlabelled".
        uncovered = ~masks.any(axis=0)
        refined[uncovered & (label < 0)] = -1
    refined_conf = mask_vote_confidence(refined, confidence, masks, painting, scores)
    rows += semantic_rows(frame, refined, refined_conf, ctx.names, LabelSource.SAM, ctx.round_index)
    return rows, refined, refined_conf


def _maskclip_grid_probs(ctx: RoundContext, store: CheckedRowReader, image: LabelImage, fine: bool = False
                         ) -> torch.Tensor:
    """MaskCLIP's class probabilities on the dense head's grid: float32 (C, h, w) on the CPU."""
    dense, keys = device_head_features(ctx, store, [image.zarr_row], with_keys=True, fine=fine)
    settings = ctx.settings
    return maskclip_probs(dense[0], keys[0], worker_classifier(ctx), key_smoothing=settings.smooths_keys(ctx.use_sam),
                          prompt_denoising=settings.prompt_denoising, pd_thresh=settings.pd_thresh).cpu()


def round0_probs(ctx: RoundContext, store: CheckedRowReader, image: LabelImage, frame: ImageFrame) -> torch.Tensor:
    """Round 0's class probabilities on the work frame: float32 (C, work_h, work_w), each
    pixel summing to 1; with a fine canvas, both canvases' logits averaged
    (:func:`batchseg.labels.maskclip.fuse_canvases`)."""
    valid_h, valid_w = _valid(ctx, image, sam_canvas=ctx.dense_on_sam_grid)
    probs = grid_probs_to_work(_maskclip_grid_probs(ctx, store, image), _dense_canvas(ctx), valid_h, valid_w, frame)
    if not ctx.fuses_fine:
        return probs
    canvas = ctx.geometry.clip_fine_canvas
    box = letterbox(image.height, image.width, canvas)  # as embed letterboxed the fine canvas
    fine = grid_probs_to_work(_maskclip_grid_probs(ctx, store, image, fine=True), canvas, box.valid_h, box.valid_w,
                              frame)
    return fuse_canvases(probs, fine, ctx.settings.fine_weight)


def _round0_image(ctx: RoundContext, store: CheckedRowReader, image: LabelImage) -> tuple[list[dict], np.ndarray, np.ndarray]:
    frame = _frame(ctx, image)
    settings = ctx.settings
    probs = round0_probs(ctx, store, image, frame)
    label, confidence = label_and_confidence(probs, settings.bg_floor)
    rows = semantic_rows(frame, label, confidence, ctx.names, LabelSource.MASKCLIP, 0)
    if not ctx.use_sam:
        return rows, label, confidence
    embedding = stored_rows(store, "sam", [image.zarr_row])[0]
    # The valid region as embed stored it: recomputed from the work frame it can be a pixel off.
    proposals = generate_proposals(_sam(ctx.sam_spec), embedding, (frame.work_h, frame.work_w), settings.proposals,
                                   input_size=(image.sam_valid_h, image.sam_valid_w))
    sam_rows, label, confidence = _refine_with_masks(ctx, frame, probs, label, confidence, proposals.masks)
    return rows + sam_rows, label, confidence


def _stored_sam_masks(shard: LabelShard) -> dict[str, list[dict]]:
    """Round-0 SAM instance masks (RLE) of the shard's images, by image id."""
    if not shard.sam_mask_parts:
        return {}
    ids = [image.image_id for image in shard.images]
    dataset = ds.dataset(list(shard.sam_mask_parts), format="parquet")
    table = dataset.to_table(
        columns=["image_id", "mask", "segment_id"],
        filter=(pc.field("image_id").isin(ids) & (pc.field("kind") == LabelKind.INSTANCE)
                & (pc.field("source") == LabelSource.SAM)),
    )
    masks: dict[str, list[dict]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["image_id"], r["segment_id"])):
        masks.setdefault(row["image_id"], []).append(row["mask"])
    return masks


def _work_masks(rles: list[dict], frame: ImageFrame) -> np.ndarray:
    if not rles:
        return np.zeros((0, frame.work_h, frame.work_w), dtype=bool)
    full = np.stack([decode_mask(rle) for rle in rles])
    if not frame.scaled:
        return full
    small = torch.nn.functional.interpolate(torch.from_numpy(full)[:, None].float(),
                                            size=(frame.work_h, frame.work_w), mode="nearest")
    return small[:, 0].numpy() > 0.5


def _student_image(ctx: RoundContext, store: CheckedRowReader, image: LabelImage,
                   sam_masks: dict[str, list[dict]]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    frame = _frame(ctx, image)
    heads = _heads(ctx)
    clip, _ = device_head_features(ctx, store, [image.zarr_row])
    sam = stored_rows(store, "sam", [image.zarr_row]) if ctx.use_sam else None
    grid_probs = ensemble_probs(heads, sam, clip)[0].cpu()
    grid, canvas = ctx.head_grid
    valid_h, valid_w = _valid(ctx, image)
    probs = grid_probs_to_work(grid_probs, canvas, valid_h, valid_w, frame)
    label, confidence = label_and_confidence(probs, ctx.settings.bg_floor)
    rows = semantic_rows(frame, label, confidence, ctx.names, LabelSource.STUDENT, ctx.round_index)
    if not ctx.use_sam:
        return rows, label, confidence
    masks = _work_masks(sam_masks.get(image.image_id, []), frame)
    sam_rows, label, confidence = _refine_with_masks(ctx, frame, probs, label, confidence, masks)
    return rows + sam_rows, label, confidence


def run_label_shard(ctx: RoundContext, shard: LabelShard) -> LabelShardResult:
    """Label one shard of images for one round and commit its part."""
    start = time.perf_counter()
    part = label_part_path(ctx.out, ctx.round_index, shard.shard_id)
    if part.exists():  # committed by an earlier attempt of this task
        return LabelShardResult(shard.shard_id, len(shard.images), 0, 0.0, already_committed=True)
    store = CheckedRowReader(ctx.out)
    grid_store = TargetGridWriter(ctx.out, ctx.round_index)
    grid, canvas = ctx.head_grid
    sam_masks = _stored_sam_masks(shard) if ctx.round_index > 0 else {}
    rows: list[dict] = []
    damaged: list[tuple[str, str]] = []
    with torch.inference_mode():
        for image in shard.images:
            try:
                if ctx.round_index == 0:
                    image_rows, label, confidence = _round0_image(ctx, store, image)
                else:
                    image_rows, label, confidence = _student_image(ctx, store, image, sam_masks)
            except DamagedRowError as exc:  # never label an image from zeros or garbage
                damaged.append((image.image_id, str(exc)))
                continue
            rows.extend(image_rows)
            valid_h, valid_w = _valid(ctx, image)
            target, target_conf = grid_targets(label, confidence, grid, canvas, valid_h, valid_w)
            grid_store.write(image.zarr_row, target, target_conf)
    write_part_atomic(labels_table(rows), part)
    return LabelShardResult(shard.shard_id, len(shard.images), len(rows),
                            time.perf_counter() - start, damaged=tuple(damaged))
