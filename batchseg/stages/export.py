"""`batchseg export OUT DEST --format coco|png|yolo`: a build's labels as a training dataset.

Reads one round's label rows (one source and kind, scores above a floor) one label part
at a time, and writes DEST in the chosen format with the images copied, linked or left
out. DEST holds::

    images/SPLIT/PATH                  the images (--images copy|link), source paths kept
    labels/SPLIT/PATH.png|.txt         png / yolo label files
    annotations/instances_SPLIT.json   coco
    classes.txt, legend.json           png;  data.yaml: yolo
    _export.json                       the settings and the counts of the last run
    _export/                           progress: one marker per label part done (+ coco fragments)

Incremental: a label part whose marker exists is not read again, so a rerun after new
images were labelled costs only the new parts (and, for COCO, streaming the fragments
into the JSON again). Parts that disappeared (a round recomputed) have their files
removed. Other settings than DEST's need --overwrite.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from batchseg.errors import UsageError
from batchseg.export import Category, ExportItem, FormatWriter
from batchseg.export.coco import CocoWriter
from batchseg.export.png import PngWriter
from batchseg.export.yolo import YoloWriter
from batchseg.io.build_info import (
    BuildImage, embed_source, label_parts, label_rounds, manifest_summary, read_json, round_class_names, vocabulary,
)
from batchseg.io.files import place_image, remove_temporaries_under, write_json_atomic
from batchseg.io.label_stream import LabelFilter, LabelUnit, choose_source, image_groups, plan_units, sources_and_kinds
from batchseg.io.runs import recorded_run
from batchseg.io.lock import LOCK_NAME, build_lock
from batchseg.stages.export_plan import ExportConfig, assign_split, export_names, split_names

SETTINGS_FILE = "_export.json"
STATE = "_export"
OUTPUTS = ("images", "labels", "annotations", STATE, "classes.txt", "legend.json", "data.yaml", SETTINGS_FILE)


@dataclass(frozen=True)
class ExportSummary:
    run_id: str
    dest: Path
    format: str
    round: int
    source: str
    kind: str
    images: int  # images in DEST
    annotations: int  # label rows (coco, png) or polygon lines (yolo)
    split_counts: dict[str, int]
    parts_written: int
    parts_skipped: int  # already exported by an earlier run
    unknown_images: int  # label rows of images no longer in the manifest: not exported
    seconds: float
    files: list[str] = field(default_factory=list)

    def text(self) -> str:
        splits = ", ".join(f"{name} {count}" for name, count in self.split_counts.items())
        what = "polygons" if self.format == "yolo" else "annotations"
        lines = [
            f"export finished: {self.images} images ({splits}), {self.annotations} {what}; "
            f"round {self.round}, source {self.source}, {self.kind} rows; "
            f"{self.parts_written} label parts written, {self.parts_skipped} already done; {self.seconds:.1f} s",
        ]
        if self.unknown_images:
            lines.append(f"note: {self.unknown_images} labelled images are no longer in the manifest; not exported")
        lines.append(f"outputs: {self.dest} ({', '.join(self.files)})")
        return "\n".join(lines)


def run_export(config: ExportConfig, progress: bool = True) -> ExportSummary:
    """Export one round of ``config.out`` into ``config.dest``; returns the summary.

    Raises ``UsageError`` for bad settings or input, ``LockedError`` when another export
    writes DEST.
    """
    config.validate()
    started = time.perf_counter()
    # The record goes to OUT, with the build's other runs; the lock is DEST's (OUT is only read).
    with build_lock(config.dest), recorded_run(config.out, "export", config.to_json()) as run:
        summary = _export_locked(config, run.run_id, progress, started)
        run.add_counts(round=summary.round, source=summary.source, images=summary.images,
                       annotations=summary.annotations, splits=summary.split_counts,
                       parts_written=summary.parts_written, parts_skipped=summary.parts_skipped,
                       seconds=summary.seconds)
    return summary


def _resolve(config: ExportConfig) -> tuple[int, str, list[Path]]:
    rounds = label_rounds(config.out)
    if not rounds:
        raise UsageError(f"{config.out} has no labels yet; run `batchseg pseudolabel {config.out} --classes ...` first")
    round_index = rounds[-1] if config.round is None else config.round
    if round_index not in rounds:
        raise UsageError(f"--round {round_index} has no labels in {config.out}; rounds: {', '.join(map(str, rounds))}")
    parts = label_parts(config.out, round_index)
    source = choose_source(sources_and_kinds(parts), config.kind, config.source, round_index)
    return round_index, source, parts


def _image_source(config: ExportConfig) -> Path | None:
    if config.images == "none":
        return None
    src = config.src or embed_source(config.out)
    if src is None or not src.is_dir():
        where = f"the recorded source folder {src} does not exist" if src else "no embed run recorded one"
        raise UsageError(f"cannot find the source images ({where}); pass --src FOLDER, or --images none")
    return src


def _prepare_dest(dest: Path, settings: dict, overwrite: bool) -> None:
    path = dest / SETTINGS_FILE
    ours = {LOCK_NAME, LOCK_NAME + ".owner"}
    if path.exists():
        stored = read_json(path).get("settings") or {}
        if stored == settings and not overwrite:
            return
        if stored != settings and not overwrite:
            diffs = [f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in settings if stored.get(k) != settings.get(k)]
            raise UsageError(f"{dest} holds an export with other settings ({'; '.join(diffs)}); "
                             "pass --overwrite to replace it, or choose a new DEST")
        for name in OUTPUTS:
            target = dest / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    elif any(p.name not in ours for p in dest.iterdir()):
        raise UsageError(f"{dest} is not empty and holds no batchseg export; choose an empty or new folder")
    write_json_atomic(path, {"settings": settings, "status": "running"}, default=str)


def _marker(dest: Path, unit: str) -> Path:
    return dest / STATE / "units" / f"{unit}.json"


def _done_units(dest: Path, units: list[LabelUnit]) -> dict[str, dict]:
    """Markers of units done earlier; markers of parts gone or changed are removed with their files."""
    current = {unit.name: unit.part.stat().st_size for unit in units}
    done: dict[str, dict] = {}
    for path in sorted((dest / STATE / "units").glob("*.json")):
        record = json.loads(path.read_text())
        if current.get(path.stem) == record.get("part_bytes"):
            done[path.stem] = record
            continue
        for rel in record.get("files", []):
            (dest / rel).unlink(missing_ok=True)
        path.unlink()
    return done


def _make_writer(config: ExportConfig, categories: list[Category], description: str) -> FormatWriter:
    if config.format == "coco":
        return CocoWriter(config.dest, categories, description)
    if config.format == "png":
        return PngWriter(config.dest, categories, config.ignore_value)
    return YoloWriter(config.dest, categories, config.kind, config.tolerance)


def _export_locked(config: ExportConfig, run_id: str, progress: bool, started: float) -> ExportSummary:
    round_index, source, parts = _resolve(config)
    names = vocabulary(config.out, [round_index])
    stale = {k: n for k, n in round_class_names(config.out, round_index).items() if k >= len(names) or names[k] != n}
    if stale:
        raise UsageError(f"round {round_index} was labelled with another vocabulary than the build's last pseudolabel "
                         f"run (class ids {sorted(stale)[:5]}); rerun pseudolabel, or export another --round")
    if config.format == "png" and len(names) >= config.ignore_value:
        raise UsageError(f"--ignore-value {config.ignore_value} is a class id of this build ({len(names)} classes); "
                         f"use a value of at least {len(names)}, e.g. 65535")
    src = _image_source(config)
    settings = {**config.settings(), "round": round_index, "source": source}
    _prepare_dest(config.dest, settings, config.overwrite)
    remove_temporaries_under(config.dest)
    manifest = manifest_summary(config.out)
    units = plan_units(parts)
    done = _done_units(config.dest, units)
    categories = [Category(k, name) for k, name in enumerate(names)]
    writer = _make_writer(config, categories, f"batchseg export of {config.out.resolve()}, round {round_index}, "
                                              f"{source} {config.kind} labels")
    flt = LabelFilter(source, config.kind, config.min_score)
    file_names = export_names(manifest.images)
    splits = split_names(config.split)
    totals = {"images": 0, "annotations": 0, "unknown": 0, "splits": {name: 0 for name in splits}}
    pending = [unit for unit in units if unit.name not in done]
    bar = tqdm(total=sum(len(u.image_ids) for u in pending), desc="export", unit="img", disable=not progress)
    try:
        for unit in units:
            record = done.get(unit.name) or _write_unit(config, writer, unit, flt, manifest.images, file_names, src, bar)
            totals["images"] += record["images"]
            totals["annotations"] += record["annotations"]
            totals["unknown"] += record["unknown_images"]
            for name, count in record["splits"].items():
                totals["splits"][name] = totals["splits"].get(name, 0) + count
    finally:
        bar.close()
    files = writer.finish([unit.name for unit in units], splits)
    files += (["labels/"] if config.format != "coco" else []) + (["images/"] if src is not None else [])
    summary = ExportSummary(
        run_id=run_id, dest=config.dest, format=config.format, round=round_index, source=source, kind=config.kind,
        images=totals["images"], annotations=totals["annotations"], split_counts=totals["splits"],
        parts_written=len(pending), parts_skipped=len(units) - len(pending), unknown_images=totals["unknown"],
        seconds=time.perf_counter() - started, files=files,
    )
    write_json_atomic(config.dest / SETTINGS_FILE, {
        "settings": settings, "status": "finished", "run_id": run_id, "out": str(config.out.resolve()),
        "classes": list(names), "images": summary.images, "annotations": summary.annotations,
        "splits": summary.split_counts, "files": files,
    }, default=str)
    return summary


def _write_unit(config: ExportConfig, writer: FormatWriter, unit: LabelUnit, flt: LabelFilter,
                images: dict[str, BuildImage], file_names: dict[str, str], src: Path | None, bar: tqdm) -> dict:
    placed: list[str] = []
    counts = {"unknown_images": 0, "splits": {}}

    def items() -> Iterator[ExportItem]:
        for image_id, rows in image_groups(unit, flt):
            bar.update(1)
            image = images.get(image_id)
            if image is None:
                counts["unknown_images"] += 1
                continue
            split = assign_split(image_id, config.split, config.seed)
            counts["splits"][split] = counts["splits"].get(split, 0) + 1
            name = file_names[image_id]
            if src is not None:
                source_path = src / image.path
                if not source_path.is_file():
                    raise UsageError(f"source image {source_path} is missing; pass --src FOLDER, or --images none")
                rel = f"images/{split}/{name}"
                place_image(source_path, config.dest / rel, config.images)
                placed.append(rel)
            yield ExportItem(image, split, name, rows)

    result = writer.write_unit(unit.name, items())
    record = {
        "part": unit.part.name,
        "part_bytes": unit.part.stat().st_size,
        "images": result.images,
        "annotations": result.annotations,
        "unknown_images": counts["unknown_images"],
        "splits": counts["splits"],
        "files": result.files + placed,
    }
    write_json_atomic(_marker(config.dest, unit.name), record, default=str)
    return record
