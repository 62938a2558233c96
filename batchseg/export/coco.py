"""COCO instance JSON (what Detectron2 and MMDetection read), written incrementally.

Each unit's images and annotations go to a JSON-lines fragment
(``DEST/_export/coco/UNIT.jsonl``, one line per image); ``finish`` streams the
fragments into ``DEST/annotations/instances_SPLIT.json``: images to the output file and
annotations to a side file appended after them, so neither the fragments nor the
output are ever held in memory. Image and annotation ids are assigned in fragment
order (units sorted by name, so later label parts append).

Segmentations are the label rows' compressed RLE in original pixels (``iscrowd`` 0,
which pycocotools accepts for RLE); ``category_id`` is class id + 1 (0 is not a COCO
category); each annotation keeps its ``score``.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Iterable

from batchseg.export import Category, ExportItem, UnitResult
from batchseg.io.files import write_text_atomic, write_with

FRAGMENTS = Path("_export") / "coco"
ANNOTATIONS = "annotations"


def category_id(class_id: int) -> int:
    return class_id + 1


def annotation_name(split: str) -> str:
    return f"{ANNOTATIONS}/instances_{split}.json"


class CocoWriter:
    def __init__(self, dest: Path, categories: list[Category], description: str) -> None:
        self.dest = dest
        self.categories = categories
        self.description = description

    def fragment(self, unit: str) -> Path:
        return self.dest / FRAGMENTS / f"{unit}.jsonl"

    def write_unit(self, unit: str, items: Iterable[ExportItem]) -> UnitResult:
        result = UnitResult()
        lines = []
        for item in items:
            annotations = [
                {
                    "category_id": category_id(row["class_id"]),
                    "segmentation": {"size": list(row["mask"]["size"]), "counts": row["mask"]["counts"]},
                    "area": int(row["area"]),
                    "bbox": [round(float(v), 2) for v in row["bbox"]],
                    "score": round(float(row["score"]), 5),
                    "iscrowd": 0,
                }
                for row in item.rows
            ]
            image = {
                "file_name": item.name,
                "height": item.image.height,
                "width": item.image.width,
                "batchseg_image_id": item.image.image_id,
            }
            lines.append(json.dumps({"split": item.split, "image": image, "annotations": annotations},
                                    separators=(",", ":")))
            result.images += 1
            result.annotations += len(annotations)
        write_text_atomic(self.fragment(unit), "".join(line + "\n" for line in lines))
        result.files.append(str(FRAGMENTS / f"{unit}.jsonl"))
        return result

    def finish(self, units: list[str], splits: list[str]) -> list[str]:
        written = []
        for split in splits:
            path = self.dest / annotation_name(split)
            side = path.with_name(f".{path.name}.annotations.part")
            try:
                write_with(path, lambda handle: self._assemble(handle, units, split, side))
            finally:
                side.unlink(missing_ok=True)
            written.append(annotation_name(split))
        return written

    def _assemble(self, handle, units: list[str], split: str, side: Path) -> None:
        info = {
            "description": self.description,
            "date_created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "version": "1.0",
        }
        categories = [{"id": category_id(c.class_id), "name": c.name, "supercategory": "object"} for c in self.categories]
        head = json.dumps({"info": info, "licenses": [], "categories": categories}, separators=(",", ":"))
        handle.write((head[:-1] + ',"images":[').encode())
        image_id = annotation_id = 0
        with open(side, "wb") as annotations:
            for unit in units:
                with open(self.fragment(unit), "rb") as fragment:
                    for line in fragment:
                        record = json.loads(line)
                        if record["split"] != split:
                            continue
                        image_id += 1
                        image = {"id": image_id, **record["image"]}
                        handle.write((("," if image_id > 1 else "") + json.dumps(image, separators=(",", ":"))).encode())
                        for ann in record["annotations"]:
                            annotation_id += 1
                            ann = {"id": annotation_id, "image_id": image_id, **ann}
                            prefix = "," if annotation_id > 1 else ""
                            annotations.write((prefix + json.dumps(ann, separators=(",", ":"))).encode())
        handle.write(b'],"annotations":[')
        with open(side, "rb") as annotations:
            shutil.copyfileobj(annotations, handle)
        handle.write(b"]}\n")
