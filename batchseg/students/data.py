"""Training data of a student: images read through the manifest, labels from one round's rows.

Images are read with the same safe reader as ``embed`` (``batchseg.io.images``) from
the source folder their manifest row was embedded from (the embed run's record says
which), and checked against their content id. Labels are rasterised from the round's
COCO RLE rows in original pixels; a row whose score (the mean label confidence over
its segment) is below ``conf_thresh`` is ignored, like the pixels of classes left out
of the student's vocabulary. Augmentation (horizontal flip, scale jitter, crop) draws
from ``numpy.random.default_rng([seed, epoch, index])``, so a sample is a pure function
of (seed, epoch, image): a resumed run sees exactly the samples an uninterrupted one does.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from batchseg.errors import UsageError
from batchseg.io.geometry import letterbox
from batchseg.io.images import ImageError, content_id, decode_image, read_image_bytes
from batchseg.labels.rle import decode_mask
# Torch-free homes (the drivers plan with them before torch is imported); re-exported.
from batchseg.students.settings import PIXEL_MEAN, PIXEL_STD, Augment  # noqa: F401
from batchseg.students.training_set import (  # noqa: F401
    TrainImage, pick_source, read_round, source_folders, train_images,
)

IGNORE = -1  # target value of pixels that do not count in the loss


def rasterise(rows: list[dict], height: int, width: int, class_map: dict[int, int], conf_thresh: float,
              unlabelled: int) -> np.ndarray:
    """Semantic rows of one image -> ``(height, width)`` int64 student targets.

    ``class_map`` maps the labels' class ids to student outputs (absent: ignored);
    rows scoring below ``conf_thresh`` are ignored; pixels no row covers get ``unlabelled``.
    """
    target = np.full((height, width), unlabelled, dtype=np.int64)
    for row in rows:
        mask = decode_mask(row["mask"])
        if mask.shape != (height, width):
            raise UsageError(f"label mask of image {row['image_id']} is {mask.shape}, the image {(height, width)}")
        value = class_map.get(row["class_id"], IGNORE) if row["score"] >= conf_thresh else IGNORE
        target[mask] = value
    return target


def read_pixels(image: TrainImage) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a training image, verified against its content id."""
    try:
        data = read_image_bytes(image.path)
        if content_id(data) != image.image_id:
            raise UsageError(f"{image.path} changed since it was embedded; rerun embed and pseudolabel, or "
                             "pass --images pointing at the original files")
        decoded = decode_image(data)
    except ImageError as exc:
        raise UsageError(f"cannot read training image {image.path}: {exc.message}") from None
    if (decoded.height, decoded.width) != (image.height, image.width):
        raise UsageError(f"{image.path} is {decoded.width}x{decoded.height}, the manifest says {image.width}x{image.height}")
    return decoded.pixels


def letterbox_tensors(pixels: np.ndarray, canvas: int, target: np.ndarray | None = None) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
    """Resize the longest side to ``canvas`` and pad bottom/right (SAM-style letterbox).

    Returns ``(image (3, canvas, canvas) uint8, target (canvas, canvas) int64 or None,
    (valid_h, valid_w))``; padding is 0 in the image and :data:`IGNORE` in the target.
    """
    h, w = pixels.shape[:2]
    box = letterbox(h, w, canvas)
    image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
    small = F.interpolate(image, size=(box.valid_h, box.valid_w), mode="bilinear", antialias=True, align_corners=False)
    out_image = torch.zeros(3, canvas, canvas, dtype=torch.uint8)
    out_image[:, : box.valid_h, : box.valid_w] = small[0].round().clamp(0, 255).to(torch.uint8)
    out_target = None
    if target is not None:
        t = F.interpolate(torch.from_numpy(target)[None, None].float(), size=(box.valid_h, box.valid_w), mode="nearest-exact")
        out_target = torch.full((canvas, canvas), IGNORE, dtype=torch.int64)
        out_target[: box.valid_h, : box.valid_w] = t[0, 0].long()
    return out_image, out_target, (box.valid_h, box.valid_w)


def normalise(image: Tensor) -> Tensor:
    """``(..., 3, H, W)`` uint8 -> float32 normalised with :data:`PIXEL_MEAN`/:data:`PIXEL_STD`."""
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(PIXEL_STD).view(3, 1, 1) * 255.0
    return (image.float() - mean) / std


def augment_stack(image: Tensor, stack: Tensor, rng: np.random.Generator, settings: Augment,
                  fill: float) -> tuple[Tensor, Tensor]:
    """Flip, scale jitter, then crop (or pad) back to the canvas.

    ``image``: (3, S, S) uint8; ``stack``: (N, S, S) float maps moved with it (nearest
    neighbour), padded with ``fill``. The random draws are the same whatever N is.
    """
    canvas = image.shape[-1]
    if settings.flip and rng.random() < 0.5:
        image, stack = image.flip(-1), stack.flip(-1)
    low, high = settings.scale
    size = max(8, int(round(canvas * float(rng.uniform(low, high)))))
    if size != canvas:
        image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
        image = image.round().clamp(0, 255).to(torch.uint8)
        if stack.shape[0]:
            stack = F.interpolate(stack[None], size=(size, size), mode="nearest-exact")[0]
        else:
            stack = stack.new_zeros((0, size, size))
    if size > canvas:
        top, left = (int(v) for v in rng.integers(0, size - canvas + 1, 2))
        return image[:, top : top + canvas, left : left + canvas], stack[:, top : top + canvas, left : left + canvas]
    out_image = torch.zeros(3, canvas, canvas, dtype=torch.uint8)
    out_stack = torch.full((stack.shape[0], canvas, canvas), fill, dtype=stack.dtype)
    out_image[:, :size, :size] = image
    out_stack[:, :size, :size] = stack
    return out_image, out_stack


def augment(image: Tensor, target: Tensor, rng: np.random.Generator, settings: Augment) -> tuple[Tensor, Tensor]:
    """:func:`augment_stack` of one ``(S, S)`` int64 target (padding :data:`IGNORE`)."""
    image, stack = augment_stack(image, target[None].float(), rng, settings, float(IGNORE))
    return image, stack[0].long()


class SemanticDataset:
    """Letterboxed (image, target) pairs, cached after the first read; augmented per (seed, epoch, index)."""

    def __init__(self, images: list[TrainImage], rows_by_image: dict[str, list[dict]], canvas: int,
                 class_map: dict[int, int], conf_thresh: float, unlabelled: int, augment_settings: Augment,
                 seed: int, cache_size: int = 4096) -> None:
        self.images = images
        self.rows = rows_by_image
        self.canvas = canvas
        self.class_map = class_map
        self.conf_thresh = conf_thresh
        self.unlabelled = unlabelled
        self.augment = augment_settings
        self.seed = seed
        self.cache: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        self.cache_size = cache_size

    def __len__(self) -> int:
        return len(self.images)

    def base(self, index: int) -> tuple[Tensor, Tensor]:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        image = self.images[index]
        target = rasterise(self.rows.get(image.image_id, []), image.height, image.width, self.class_map,
                           self.conf_thresh, self.unlabelled)
        pixels, labels, _ = letterbox_tensors(read_pixels(image), self.canvas, target)
        self.cache[index] = (pixels, labels)
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return pixels, labels

    def sample(self, index: int, epoch: int) -> tuple[Tensor, Tensor]:
        """``(3, S, S)`` float32 normalised pixels and ``(S, S)`` int64 targets (:data:`IGNORE` = not learnt)."""
        pixels, labels = self.base(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        pixels, labels = augment(pixels, labels, rng, self.augment)
        return normalise(pixels), labels

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def class_counts(self, num_outputs: int) -> np.ndarray:
        """Target pixels per output over the (un-augmented) letterboxed dataset, ``(K,)`` int64."""
        counts = np.zeros(num_outputs, dtype=np.int64)
        for index in range(len(self)):
            target = self.base(index)[1]
            counts += np.bincount(target[target >= 0].numpy(), minlength=num_outputs)[:num_outputs]
        return counts
