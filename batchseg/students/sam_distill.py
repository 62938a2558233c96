"""EdgeSAM's two distillation phases, as an ``Objective`` of the shared training loop.

The teacher is the build's SAM, but its image encoder never runs: its outputs are the
embeddings ``embed`` stored (``embeddings.zarr`` array ``sam``, one ``(C, h, w)`` row
per image). Images are read through the manifest and preprocessed as SAM does.

* Phase 1 (epochs ``< phase1_epochs``), encoder-only: pixel-wise MSE between the
  student's ``(B, C, h, w)`` embedding and the stored one, over the grid cells that
  cover the image (the padding of the square canvas is masked out).
* Phase 2, prompt-in-the-loop: the teacher's frozen prompt encoder and mask decoder
  decode both embeddings from the same prompts. Prompts come from objects: the
  build's instance pseudo labels (box, and a point inside the mask) and the teacher's
  own masks (a random point in the image decoded from the stored embedding, and that
  mask's box). Each object is prompted with its box or its point, decoded, then
  refined ``refine_iterations`` times, each adding one point from the error region
  between the student's and the teacher's mask (a missed pixel gives a positive
  point, a spurious one a negative point). The loss, ``5 BCE + 5 Dice`` of the
  student's low-resolution mask logits against the teacher's binary mask (padding
  masked), is averaged over the decodes.

All randomness is ``numpy.random.default_rng([seed, epoch, index, ...])``: a resumed
run sees the same prompts as an uninterrupted one.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from torch import Tensor

from batchseg.errors import UsageError
from batchseg.labels.rle import decode_mask
from batchseg.models.sam import sam_preprocess
from batchseg.students.data import read_pixels
from batchseg.students.settings import PromptSettings  # noqa: F401  (torch-free home; re-exported)
from batchseg.students.training_set import DistillImage  # noqa: F401  (torch-free home; re-exported)


@dataclass(frozen=True)
class _Object:
    box: np.ndarray  # (4,) float32 x0, y0, x1, y1 on the canvas
    point: np.ndarray  # (2,) float32 x, y on the canvas


class SamDistillObjective:
    """Phase 1 and phase 2 losses of a student encoder against stored teacher embeddings."""

    def __init__(self, images: list[DistillImage], embeddings, teacher: Sam, phase1_epochs: int,
                 prompts: PromptSettings, label_rows: dict[str, list[dict]], seed: int, device: str,
                 cache_bytes: int = 1 << 29) -> None:
        self.images = images
        self.embeddings = embeddings  # zarr array (N, C, h, w), or anything indexable by row
        self.teacher = teacher
        self.phase1_epochs = phase1_epochs
        self.prompts = prompts
        self.label_rows = label_rows
        self.seed = seed
        self.device = device
        self.size = int(teacher.prompt_encoder.input_image_size[0])
        self.grid = int(teacher.prompt_encoder.image_embedding_size[0])
        self.low = 4 * self.grid  # side of the decoder's mask logits
        self._mean = teacher.pixel_mean.detach().cpu().float().reshape(3, 1, 1)
        self._std = teacher.pixel_std.detach().cpu().float().reshape(3, 1, 1)
        self._cache: OrderedDict[int, Tensor] = OrderedDict()
        self._cache_items = max(1, cache_bytes // (3 * self.size * self.size * 4))
        self._label_objects: dict[int, list[_Object]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    # ----------------------------------------------------------------- data

    def _pixels(self, index: int) -> Tensor:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        item = self.images[index]
        canvas = sam_preprocess(read_pixels(item.image), self.size, self._mean, self._std)
        self._cache[index] = canvas
        while len(self._cache) > self._cache_items:
            self._cache.popitem(last=False)
        return canvas

    def _valid_cells(self, item: DistillImage, side: int) -> Tensor:
        """``(side, side)`` bool: cells of a ``side``-grid over the canvas that cover the image."""
        mask = torch.zeros(side, side, dtype=torch.bool)
        mask[: math.ceil(item.valid_h * side / self.size), : math.ceil(item.valid_w * side / self.size)] = True
        return mask

    def _batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        pixels = torch.stack([self._pixels(i) for i in indices]).to(self.device)
        teacher = torch.stack([torch.from_numpy(np.asarray(self.embeddings[self.images[i].zarr_row], dtype=np.float32))
                               for i in indices]).to(self.device)
        cells = torch.stack([self._valid_cells(self.images[i], self.grid) for i in indices]).to(self.device)
        return pixels, teacher, cells[:, None]

    # ----------------------------------------------------------------- losses

    def loss(self, model: torch.nn.Module, indices: list[int], epoch: int) -> tuple[Tensor, int]:
        pixels, teacher, cells = self._batch(indices)
        student = model(pixels)
        if student.shape != teacher.shape:
            raise UsageError(f"the student encoder outputs {tuple(student.shape[1:])}, the stored embeddings are "
                             f"{tuple(teacher.shape[1:])}")
        if epoch < self.phase1_epochs:
            weight = cells.to(student.dtype)
            error = ((student - teacher) ** 2 * weight).sum()
            used = int(weight.sum().item())
            return error / max(1, used * student.shape[1]), used
        return self._prompt_phase(student, teacher, indices, epoch)

    def _prompt_phase(self, student: Tensor, teacher: Tensor, indices: list[int], epoch: int) -> tuple[Tensor, int]:
        """Phase 2 on a batch: every image's objects, prompted by box or point, decoded in two batched groups."""
        rngs = [np.random.default_rng([self.seed, epoch, int(index), 2]) for index in indices]
        objects = self._objects(rngs, indices, teacher)
        valid = torch.stack([self._valid_cells(self.images[i], self.low) for i in indices])[:, None].to(self.device)
        groups: dict[bool, list[tuple[int, _Object]]] = {True: [], False: []}
        for b, found in enumerate(objects):
            for obj, use_box in zip(found, rngs[b].random(len(found)) < self.prompts.box_share):
                groups[bool(use_box)].append((b, obj))
        rng = np.random.default_rng([self.seed, epoch, int(indices[0]), 3])
        losses, used = [], 0
        for with_box, members in groups.items():
            if members:
                rows = torch.tensor([b for b, _ in members], device=self.device)
                loss = self._prompt_loss(rng, student[rows], teacher[rows], [o for _, o in members], with_box,
                                         valid[rows])
                losses.append(loss * len(members))
                used += len(members)
        if not losses:
            return (student * 0).sum(), 0
        return torch.stack(losses).sum() / used, used

    def _decode(self, embeddings: Tensor, coords: Tensor | None, labels: Tensor | None, boxes: Tensor | None,
                multimask: bool) -> tuple[Tensor, Tensor]:
        """Mask logits ``(K, M, L, L)`` and predicted IoUs ``(K, M)`` of K prompts, prompt k on ``embeddings[k]``.

        ``embeddings`` is ``(K, C, h, w)``, one (possibly repeated) image embedding per prompt: the
        decoder's own ``forward`` takes one image per call, which would mean a call per image.
        """
        encoder = self.teacher.prompt_encoder
        points = (coords, labels) if coords is not None and coords.shape[1] else None
        sparse, dense = encoder(points=points, boxes=boxes, masks=None)
        return decode_per_prompt(self.teacher.mask_decoder, embeddings, encoder.get_dense_pe(), sparse, dense,
                                 multimask)

    def _mask_loss(self, logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """``5 BCE + 5 Dice`` of ``(K, 1, L, L)`` logits against binary targets, over ``valid`` pixels."""
        weight = valid.to(logits.dtype).expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum()
        prob = torch.sigmoid(logits) * weight
        inter = (prob * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + (target * weight).flatten(1).sum(1) + 1)
        return self.prompts.bce_weight * bce + self.prompts.dice_weight * dice.mean()

    def _prompt_loss(self, rng: np.random.Generator, student: Tensor, teacher: Tensor, objects: list[_Object],
                     with_box: bool, valid: Tensor) -> Tensor:
        """Mean mask loss over the decodes of K objects.

        ``student`` and ``teacher`` are ``(K, C, h, w)`` embeddings (one per object), ``valid`` ``(K, 1, L, L)``.
        """
        k = len(objects)
        boxes = torch.from_numpy(np.stack([o.box for o in objects])).to(self.device) if with_box else None
        coords = torch.zeros(k, 0, 2, device=self.device)
        labels = torch.zeros(k, 0, dtype=torch.int64, device=self.device)
        if not with_box:
            coords = torch.from_numpy(np.stack([o.point for o in objects]))[:, None].to(self.device)
            labels = torch.ones(k, 1, dtype=torch.int64, device=self.device)
        losses = []
        rows = torch.arange(k, device=self.device)
        for step in range(1 + self.prompts.refine_iterations):
            multimask = step == 0 and not with_box  # one point is ambiguous: take the teacher's best of three
            with torch.no_grad():
                teacher_logits, iou = self._decode(teacher, coords, labels, boxes, multimask)
            student_logits, _ = self._decode(student, coords, labels, boxes, multimask)
            if multimask:
                best = iou.argmax(1)
                teacher_logits = teacher_logits[rows, best][:, None]
                student_logits = student_logits[rows, best][:, None]
            target = (teacher_logits > 0).to(student_logits.dtype)
            losses.append(self._mask_loss(student_logits, target, valid))
            if step < self.prompts.refine_iterations:
                point, label = self._error_points(rng, student_logits.detach() > 0, target > 0.5, valid)
                coords = torch.cat([coords, point.to(self.device)[:, None]], 1)
                labels = torch.cat([labels, label.to(self.device)[:, None]], 1)
        return torch.stack(losses).mean()

    def _error_points(self, rng: np.random.Generator, predicted: Tensor, target: Tensor, valid: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """One new point per mask from its error region: ``(K, 2)`` canvas coordinates, ``(K,)`` labels.

        A pixel the student missed gives a positive point, a spurious one a negative point; with no
        error left, a positive point inside the teacher's mask (or a negative one when that is empty).
        """
        missed = (target & ~predicted & valid).cpu().numpy()[:, 0]
        spurious = (predicted & ~target & valid).cpu().numpy()[:, 0]
        inside = (target & valid).cpu().numpy()[:, 0]
        image = valid.cpu().numpy()[:, 0]
        scale = self.size / self.low
        points, labels = [], []
        for k in range(missed.shape[0]):
            error = missed[k] | spurious[k]
            pool, fallback = (error, None) if error.any() else (inside[k], 1)
            if not pool.any():
                pool, fallback = image[k], 0
            ys, xs = np.nonzero(pool)
            pick = int(rng.integers(len(ys)))
            y, x = int(ys[pick]), int(xs[pick])
            points.append(((x + 0.5) * scale, (y + 0.5) * scale))
            labels.append(int(missed[k, y, x]) if fallback is None else fallback)
        return torch.tensor(points, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)

    # ----------------------------------------------------------------- prompts

    def _objects(self, rngs: list[np.random.Generator], indices: list[int], teacher: Tensor) -> list[list[_Object]]:
        """Per image, up to ``objects_per_image`` objects: pseudo-label instances (half at most), then teacher masks."""
        wanted = self.prompts.objects_per_image
        chosen = []
        for rng, index in zip(rngs, indices):
            labelled = self._labelled_objects(index)
            take = min(len(labelled), (wanted + 1) // 2)
            chosen.append([labelled[i] for i in rng.permutation(len(labelled))[:take]])
        extra = self._teacher_objects(rngs, indices, teacher, [wanted - len(c) for c in chosen])
        return [c + e for c, e in zip(chosen, extra)]

    def _labelled_objects(self, index: int) -> list[_Object]:
        if index not in self._label_objects:
            item = self.images[index]
            sy, sx = item.valid_h / item.image.height, item.valid_w / item.image.width
            objects = []
            rng = np.random.default_rng([self.seed, int(index), 1])
            for row in self.label_rows.get(item.image.image_id, []):
                x, y, w, h = (float(v) for v in row["bbox"])
                mask = decode_mask(row["mask"])
                ys, xs = np.nonzero(mask)
                if w <= 0 or h <= 0 or not len(ys):
                    continue
                pick = int(rng.integers(len(ys)))
                objects.append(_Object(np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy], np.float32),
                                       np.array([(xs[pick] + 0.5) * sx, (ys[pick] + 0.5) * sy], np.float32)))
            self._label_objects[index] = objects
        return self._label_objects[index]

    @torch.no_grad()
    def _teacher_objects(self, rngs: list[np.random.Generator], indices: list[int], teacher: Tensor,
                         counts: list[int]) -> list[list[_Object]]:
        """Masks the teacher decodes from random points in each image (twice as many tries as wanted, one
        batched decode); each mask gives its point and its box. ``teacher`` is ``(B, C, h, w)``."""
        rows, points = [], []
        for b, (rng, index, count) in enumerate(zip(rngs, indices, counts)):
            item = self.images[index]
            tries = 2 * max(0, count)
            rows += [b] * tries
            points.append(np.stack([rng.uniform(0, item.valid_w, tries), rng.uniform(0, item.valid_h, tries)], 1))
        found: list[list[_Object]] = [[] for _ in indices]
        if not rows:
            return found
        points_np = np.concatenate(points).astype(np.float32)
        row_index = torch.tensor(rows, device=self.device)
        coords = torch.from_numpy(points_np)[:, None].to(self.device)
        labels = torch.ones(len(rows), 1, dtype=torch.int64, device=self.device)
        logits, iou = self._decode(teacher[row_index], coords, labels, None, True)
        masks = logits[torch.arange(len(rows), device=self.device), iou.argmax(1)] > 0
        valid = torch.stack([self._valid_cells(self.images[indices[b]], self.low) for b in rows]).to(self.device)
        scale = self.size / self.low
        for k, mask in enumerate((masks & valid).cpu().numpy()):
            b = rows[k]
            ys, xs = np.nonzero(mask)
            if len(ys) < 2 or len(found[b]) >= counts[b]:
                continue
            box = np.array([xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale, (ys.max() + 1) * scale],
                           np.float32)
            found[b].append(_Object(box, points_np[k]))
        return found


def decode_per_prompt(decoder: MaskDecoder, embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
                      multimask: bool) -> tuple[Tensor, Tensor]:
    """SAM's mask decoder with one image embedding per prompt instead of one per call.

    Equals ``decoder(embeddings[k:k+1], image_pe, sparse[k:k+1], dense[k:k+1], multimask)`` for every
    ``k`` (a test checks it), in one batched pass: the same steps as ``MaskDecoder.predict_masks``
    (output tokens + prompt tokens, two-way transformer over the embedding plus dense prompt,
    upscaling, hypernetwork masks, IoU head), with the embedding indexed instead of repeated.

    Args:
        embeddings: ``(K, C, h, w)``; image_pe: ``(1, C, h, w)``; sparse: ``(K, n, C)``; dense: ``(K, C, h, w)``.

    Returns:
        Mask logits ``(K, M, 4h, 4w)`` and IoU predictions ``(K, M)``; ``M`` = 3 with ``multimask``, else 1.
    """
    k = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
    tokens = torch.cat([output_tokens[None].expand(k, -1, -1), sparse], 1)
    src = embeddings + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(k, -1, -1, -1), tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens]
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    _, cu, hu, wu = upscaled.shape
    masks = (hyper @ upscaled.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
    iou = decoder.iou_prediction_head(hs[:, 0])
    chosen = slice(1, None) if multimask else slice(0, 1)
    return masks[:, chosen], iou[:, chosen]
