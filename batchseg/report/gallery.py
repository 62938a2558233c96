"""The report's gallery: a handful of images per class, drawn with their labels, and thumbnails.

Selection streams over the label parts reading four small columns, keeping per class
the ``per_class`` images where that class covers the most pixels (a heap per class);
only the chosen images' masks are read and drawn.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from batchseg.io.statuses import LabelKind
from batchseg.io.tables import read_part
from PIL import Image

from batchseg.io.build_info import BuildImage
from batchseg.io.files import save_image_atomic
from batchseg.io.images import ImageError, decode_image
from batchseg.report.overlay import render_overlay

THUMB_SIDE = 320


@dataclass(frozen=True)
class GalleryImage:
    """One drawn image: its file in the report folder and what it shows."""

    image_id: str
    path: str  # the source image, relative to the source folder
    file: str  # relative to the report folder
    classes: tuple[str, ...]  # class names drawn (with their scores in the legend)


def pick_gallery(parts: list[Path], source: str, per_class: int) -> dict[int, list[str]]:
    """class id -> up to ``per_class`` image ids where the class covers most pixels (largest first)."""
    heaps: dict[int, list[tuple[int, str]]] = {}
    expression = (ds.field("source") == source) & (ds.field("kind") == LabelKind.SEMANTIC)
    for part in parts:
        table = read_part(part, columns=["image_id", "class_id", "area"], filters=expression)
        for image_id, class_id, area in zip(*(table.column(c).to_pylist() for c in ("image_id", "class_id", "area"))):
            heap = heaps.setdefault(class_id, [])
            item = (int(area), image_id)
            if len(heap) < per_class:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return {k: [image_id for _, image_id in sorted(heap, reverse=True)] for k, heap in sorted(heaps.items())}


def semantic_rows(parts: list[Path], source: str, image_ids: set[str]) -> dict[str, list[dict]]:
    """The semantic label rows of ``image_ids`` from ``source``, by image id."""
    if not image_ids:
        return {}
    expression = ((ds.field("source") == source) & (ds.field("kind") == LabelKind.SEMANTIC)
                  & ds.field("image_id").isin(pa.array(sorted(image_ids), type=pa.string())))
    found: dict[str, list[dict]] = {}
    for part in parts:
        table = read_part(part, columns=["image_id", "class_id", "class_name", "score", "mask"], filters=expression)
        for row in table.to_pylist():
            found.setdefault(row["image_id"], []).append(row)
    return found


def load_pixels(src: Path, image: BuildImage) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of a source image, or None when it is gone or no longer decodes."""
    try:
        decoded = decode_image((src / image.path).read_bytes())
    except (OSError, ImageError):
        return None
    return decoded.pixels


def _thumbnail(picture: Image.Image, side: int) -> Image.Image:
    picture = picture.copy()
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    return picture


def draw_overlay(src: Path, image: BuildImage, rows: list[dict], folder: Path, name: str) -> GalleryImage | None:
    """Draw ``rows`` over the image and save a JPEG thumbnail under ``folder``; None if unreadable."""
    pixels = load_pixels(src, image)
    if pixels is None or pixels.shape[:2] != (image.height, image.width):
        return None
    picture = _thumbnail(render_overlay(pixels, rows), THUMB_SIDE)
    save_image_atomic(picture, folder / name, quality=85)
    classes = tuple(row["class_name"] for row in sorted(rows, key=lambda r: r["class_id"]))
    return GalleryImage(image.image_id, image.path, f"{folder.name}/{name}", classes)


def draw_thumbnail(src: Path, image: BuildImage, folder: Path, name: str, side: int = 160) -> str | None:
    """Save a plain JPEG thumbnail; the file relative to the report folder, None if unreadable."""
    pixels = load_pixels(src, image)
    if pixels is None:
        return None
    save_image_atomic(_thumbnail(Image.fromarray(pixels), side), folder / name, quality=85)
    return f"{folder.name}/{name}"
