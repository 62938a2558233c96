"""Training data of the instance student: per image, its objects' masks and classes on the canvas.

Objects are a round's instance rows (SAM masks recognised by CLIP) of the chosen
source and classes whose score reaches ``conf_thresh``; images, letterboxing and the
seeded augmentation are the semantic student's (``batchseg.students.data``).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from batchseg.labels.rle import decode_mask
from batchseg.students.data import Augment, TrainImage, augment_stack, letterbox_tensors, normalise, read_pixels

MIN_AREA = 4  # canvas pixels: smaller objects (e.g. cropped away) are dropped


def masks_to_boxes(masks: Tensor) -> Tensor:
    """``(N, S, S)`` bool -> ``(N, 4)`` xyxy tight boxes in pixels (max edge exclusive)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    idx = torch.arange(masks.shape[-1], dtype=torch.float32)
    big = float(masks.shape[-1] + 1)
    y0 = torch.where(rows, idx, big).min(dim=1).values
    y1 = torch.where(rows, idx, -1.0).max(dim=1).values + 1
    x0 = torch.where(cols, idx, big).min(dim=1).values
    x1 = torch.where(cols, idx, -1.0).max(dim=1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1)


class InstanceDataset:
    """``sample(index, epoch) -> (pixels (3, S, S) float32, masks (N, S, S) bool, classes (N,) int64)``."""

    def __init__(self, images: list[TrainImage], rows_by_image: dict[str, list[dict]], canvas: int,
                 class_map: dict[int, int], conf_thresh: float, augment_settings: Augment, seed: int,
                 cache_size: int = 2048) -> None:
        self.images = images
        self.rows = rows_by_image
        self.canvas = canvas
        self.class_map = class_map
        self.conf_thresh = conf_thresh
        self.augment = augment_settings
        self.seed = seed
        self.cache: OrderedDict[int, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self.cache_size = cache_size

    def __len__(self) -> int:
        return len(self.images)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def base(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        image = self.images[index]
        rows = [r for r in self.rows.get(image.image_id, [])
                if r["score"] >= self.conf_thresh and r["class_id"] in self.class_map]
        pixels, _, (valid_h, valid_w) = letterbox_tensors(read_pixels(image), self.canvas)
        masks = torch.zeros((len(rows), self.canvas, self.canvas), dtype=torch.bool)
        if rows:
            full = torch.from_numpy(np.stack([decode_mask(r["mask"]) for r in rows])).float()
            small = F.interpolate(full[None], size=(valid_h, valid_w), mode="nearest-exact")[0] > 0.5
            masks[:, :valid_h, :valid_w] = small
        classes = torch.tensor([self.class_map[r["class_id"]] for r in rows], dtype=torch.int64)
        self.cache[index] = (pixels, masks, classes)
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return pixels, masks, classes

    def sample(self, index: int, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        pixels, masks, classes = self.base(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        pixels, stack = augment_stack(pixels, masks.float(), rng, self.augment, 0.0)
        masks = stack > 0.5
        keep = masks.flatten(1).sum(1) >= MIN_AREA
        return normalise(pixels), masks[keep], classes[keep]
