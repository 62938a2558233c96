"""Semantic label maps as PNG (VOC style), what semantic-segmentation code reads.

One single-channel PNG per image at its original size, ``DEST/labels/SPLIT/NAME.png``:
pixel value = class id, ``ignore_value`` (default 255) where no label row covers the
pixel. With an ignore value up to 255 the PNG is 8-bit palette (``P``) coloured like
batchseg's overlays, so viewers show colours while training code reads the indices;
above 255 (vocabularies of 255 classes or more) it is 16-bit grey (``I;16``).
``DEST/classes.txt`` names the class of each value (line k = value k) and
``DEST/legend.json`` lists values, names, colours and the ignore value.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from batchseg.export import Category, ExportItem, UnitResult
from batchseg.io.files import save_image_atomic, write_text_atomic
from batchseg.labels.rle import decode_mask
from batchseg.report.overlay import class_colour

IGNORE_COLOUR = (255, 255, 255)


def label_map(rows: list[dict], height: int, width: int, ignore_value: int) -> np.ndarray:
    """(H, W) uint8/uint16 map: each row's mask painted with its class id, ``ignore_value`` elsewhere.

    Rows are semantic (they never overlap); should two overlap, the later one wins.
    """
    dtype = np.uint8 if ignore_value <= 255 else np.uint16
    out = np.full((height, width), ignore_value, dtype=dtype)
    for row in rows:
        mask = decode_mask(row["mask"])
        if mask.shape != (height, width):
            raise ValueError(f"mask of size {mask.shape} for an image of size {(height, width)}")
        out[mask] = row["class_id"]
    return out


def palette(num_classes: int, ignore_value: int) -> list[int]:
    colours = [(0, 0, 0)] * 256
    for class_id in range(min(num_classes, 256)):
        colours[class_id] = class_colour(class_id)
    colours[ignore_value] = IGNORE_COLOUR
    return [v for colour in colours for v in colour]


class PngWriter:
    def __init__(self, dest: Path, categories: list[Category], ignore_value: int) -> None:
        self.dest = dest
        self.categories = categories
        self.ignore_value = ignore_value
        self.num_classes = max((c.class_id for c in categories), default=-1) + 1
        self._palette = palette(self.num_classes, ignore_value) if ignore_value <= 255 else None

    def write_unit(self, unit: str, items: Iterable[ExportItem]) -> UnitResult:
        result = UnitResult()
        for item in items:
            values = label_map(item.rows, item.image.height, item.image.width, self.ignore_value)
            if self._palette is not None:
                image = Image.fromarray(values, mode="L").convert("P")
                image.putpalette(self._palette)
            else:
                image = Image.fromarray(values)  # uint16: mode I;16
            rel = f"labels/{item.split}/{item.label_name('.png')}"
            save_image_atomic(image, self.dest / rel)
            result.images += 1
            result.annotations += len(item.rows)
            result.files.append(rel)
        return result

    def finish(self, units: list[str], splits: list[str]) -> list[str]:
        names = {c.class_id: c.name for c in self.categories}
        lines = [names.get(k, f"class_{k}") for k in range(self.num_classes)]
        write_text_atomic(self.dest / "classes.txt", "".join(line + "\n" for line in lines))
        legend = {
            "format": "png label maps, one per image at original size; pixel value = class id",
            "ignore_value": self.ignore_value,
            "ignore_meaning": "no label (unlabelled or below --min-score); not to be trained on",
            "bit_depth": 8 if self._palette is not None else 16,
            "classes": [
                {"value": k, "name": lines[k], "colour": list(class_colour(k))} for k in range(self.num_classes)
            ],
            "splits": {split: f"labels/{split}" for split in splits},
        }
        write_text_atomic(self.dest / "legend.json", json.dumps(legend, indent=2) + "\n")
        return ["classes.txt", "legend.json"]
