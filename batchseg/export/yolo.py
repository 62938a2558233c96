"""Ultralytics YOLO segmentation format: one ``.txt`` per image, normalised polygons.

``DEST/labels/SPLIT/NAME.txt`` beside ``DEST/images/SPLIT/NAME.ext`` (Ultralytics finds
a label by replacing ``/images/`` with ``/labels/`` and the extension with ``.txt``);
each line ``class x1 y1 x2 y2 ...`` with x divided by the image width and y by its
height, pixel-centre coordinates (``batchseg.export.polygons``). A semantic row (all
pixels of one class) gives one line per connected component, an instance row one
line (its pieces joined). ``DEST/data.yaml`` names the classes and splits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import yaml

from batchseg.export import Category, ExportItem, UnitResult
from batchseg.export.polygons import mask_polygons, merge_polygons
from batchseg.io.files import write_text_atomic
from batchseg.io.statuses import LabelKind
from batchseg.labels.rle import decode_mask

DECIMALS = 6


def polygon_line(class_id: int, polygon: np.ndarray, height: int, width: int) -> str:
    scaled = polygon / np.array([width, height], dtype=np.float64)
    coords = " ".join(f"{v:.{DECIMALS}f}" for v in np.clip(scaled, 0.0, 1.0).reshape(-1))
    return f"{class_id} {coords}"


def row_lines(row: dict, kind: str, height: int, width: int, tolerance: float) -> list[str]:
    """YOLO lines of one label row (empty when the mask has no component to trace)."""
    polygons = mask_polygons(decode_mask(row["mask"]), tolerance)
    if not polygons:
        return []
    if kind == LabelKind.INSTANCE:
        polygons = [merge_polygons(polygons)]
    return [polygon_line(row["class_id"], p, height, width) for p in polygons]


class YoloWriter:
    def __init__(self, dest: Path, categories: list[Category], kind: str, tolerance: float) -> None:
        self.dest = dest
        self.categories = categories
        self.kind = kind
        self.tolerance = tolerance

    def write_unit(self, unit: str, items: Iterable[ExportItem]) -> UnitResult:
        result = UnitResult()
        for item in items:
            lines = []
            for row in item.rows:
                lines += row_lines(row, self.kind, item.image.height, item.image.width, self.tolerance)
            rel = f"labels/{item.split}/{item.label_name('.txt')}"
            write_text_atomic(self.dest / rel, "".join(line + "\n" for line in lines))
            result.images += 1
            result.annotations += len(lines)
            result.files.append(rel)
        return result

    def finish(self, units: list[str], splits: list[str]) -> list[str]:
        num_classes = max((c.class_id for c in self.categories), default=-1) + 1
        names = {c.class_id: c.name for c in self.categories}
        data = {"path": str(self.dest.resolve())}
        for split in splits:
            data[split] = f"images/{split}"
        if "val" not in splits:  # Ultralytics needs a val set; without --split it validates on train
            data["val"] = f"images/{splits[0]}"
        data["nc"] = num_classes
        data["names"] = {k: names.get(k, f"class_{k}") for k in range(num_classes)}
        text = "# Ultralytics YOLO segmentation dataset written by `batchseg export --format yolo`\n"
        text += yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        write_text_atomic(self.dest / "data.yaml", text)
        return ["data.yaml"]
