"""`batchseg evaluate`: measure the pseudo labels of a build against a few hand-labelled images.

Ground truth (PNG label maps or COCO instance JSON) is read and checked by
``batchseg.io.ground_truth``.

Background: ground-truth background pixels are scored as the class "background" only
when the build's vocabulary has a class of that name (``pseudolabel --background``).
Otherwise they are not scored: MaskCLIP without a background class labels every pixel
with some object class and cannot be scored on background.

Predictions: for every round and source (``maskclip`` = MaskCLIP alone, round 0;
``sam`` = the semantic map voted by SAM masks, every round; ``student`` = the
self-training head of round k), the semantic label rows of an image are painted into
one label map in original pixels; pixels no row covers are unlabelled and count as
wrong. An image is scored in a round when the round has label rows for it.

Scores come from confusion matrices summed over images (see
``batchseg.labels.metrics``): per-class IoU (nan for classes absent from the ground
truth), mIoU over the classes present in the ground truth, pixel accuracy.
Results are printed as a table and written to ``OUT/eval/_<EVAL_ID>.json`` (the underscore keeps it out of the Parquet dataset) and
``OUT/eval/<EVAL_ID>.parquet`` (one row per round, source and class), where EVAL_ID is
a UTC timestamp plus a short random suffix, e.g. ``20250101T120000Z-1a2b3c``.
Evaluation reads the build under its lock; like every command it leaves a run record in
``OUT/runs/RUN_ID.json``.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchseg.choices import BACKGROUND
from batchseg.config import read_build_file
from batchseg.io.files import write_json_atomic
from batchseg.errors import UsageError
from batchseg.io.build_info import label_rounds
from batchseg.io.ground_truth import IGNORE, GtItem, read_ground_truth
from batchseg.io.lock import build_lock
from batchseg.io.runs import new_run_id, recorded_run
from batchseg.io.statuses import LabelKind, LabelSource
from batchseg.io.tables import EVAL_FOLDER, EVAL_SCHEMA, EVAL_VERSION, read_labels, write_part_atomic
from batchseg.labels.metrics import Scores, confusion, scores_from_confusion
from batchseg.labels.rle import decode_mask
from batchseg.stages.evaluate_options import EvaluateConfig  # noqa: F401  (re-exported; its home is light)

__all__ = ["EVAL_SCHEMA", "EvaluateConfig", "EvaluateReport", "SourceResult", "describe_source", "run_evaluate"]
# What a round starts from, then SAM's vote on it.
SOURCE_ORDER = {LabelSource.MASKCLIP: 0, LabelSource.STUDENT: 1, LabelSource.SAM: 2}


@dataclass(frozen=True)
class SourceResult:
    """Scores of one (round, source) over the images it labelled."""

    round: int
    source: str
    images: int
    scores: Scores


@dataclass(frozen=True)
class EvaluateReport:
    eval_id: str
    out: Path
    gt: Path
    gt_format: str
    class_names: tuple[str, ...]
    background_scored: bool
    images_matched: int
    results: tuple[SourceResult, ...]
    notes: tuple[str, ...]
    json_path: Path
    parquet_path: Path

    def text(self) -> str:
        shown = [c for c in range(len(self.class_names))
                 if any(r.scores.gt_pixels[c] > 0 for r in self.results)]
        header = ["round", "source", "images", "mIoU", "pixAcc"] + [self.class_names[c] for c in shown]
        rows = [
            [str(r.round), r.source, str(r.images), _pct(r.scores.miou), _pct(r.scores.pixel_accuracy)]
            + [_pct(r.scores.iou[c]) for c in shown]
            for r in self.results
        ]
        widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
        fmt = lambda line: "  ".join(  # noqa: E731
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
        ).rstrip()
        lines = [
            f"evaluation of {self.out} against {self.gt} ({self.gt_format}, {self.images_matched} images matched); "
            "IoU and accuracy in %:",
            fmt(header),
            *(fmt(row) for row in rows),
        ]
        lines += [f"note: {note}" for note in self.notes]  # what was skipped is said, never silently dropped
        hidden = len(self.class_names) - len(shown)
        if hidden:
            lines.append(f"({hidden} classes absent from the ground truth are not shown; their IoU is null in the files)")
        if not self.background_scored:
            lines.append(f'(no "{BACKGROUND}" class in the vocabulary: ground-truth background pixels are not scored)')
        lines.append(f"written: {self.json_path} and {self.parquet_path}")
        return "\n".join(lines)


def describe_source(round_index: int, source: str) -> str:
    """Words for the labels of one (round, source), as reports show them."""
    if round_index == 0:
        words = {LabelSource.MASKCLIP: "MaskCLIP alone", LabelSource.SAM: "MaskCLIP + SAM refinement"}
    else:
        words = {LabelSource.STUDENT: "self-training head", LabelSource.SAM: "head + SAM refinement"}
    return words.get(source, source)


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _none_if_nan(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------- predictions


@dataclass
class _Predictions:
    """Semantic label rows of the evaluated images, by (round, source) and image id."""

    rows: dict[tuple[int, str], dict[str, list[tuple[int, dict]]]]
    labelled: dict[int, set[str]]  # image ids each round has any label row for


def _round_names(table: pa.Table) -> dict[int, str]:
    pairs = table.select(["class_id", "class_name"]).group_by(["class_id", "class_name"]).aggregate([]).to_pylist()
    names: dict[int, str] = {}
    for pair in pairs:
        if names.setdefault(pair["class_id"], pair["class_name"]) != pair["class_name"]:
            raise UsageError(f"label rows name class id {pair['class_id']} both "
                             f"{names[pair['class_id']]!r} and {pair['class_name']!r}; rerun pseudolabel with --overwrite")
    return names


def _vocabulary(out: Path, tables: dict[int, pa.Table], notes: list[str]) -> tuple[tuple[str, ...], dict[int, pa.Table]]:
    """The build's class names, and the rounds whose labels use them (stale rounds are skipped)."""
    build = read_build_file(out) or {}
    classes = ((build.get("pseudolabel") or {}).get("labels") or {}).get("classes")
    per_round = {k: _round_names(t) for k, t in tables.items()}
    if classes:
        names = tuple(str(c) for c in classes)
        kept = {}
        for k, table in tables.items():
            if all(cid < len(names) and names[cid] == name for cid, name in per_round[k].items()):
                kept[k] = table
            else:
                notes.append(f"round {k} was labelled with another vocabulary than the build's last pseudolabel "
                             "run (a stale round); skipped")
        return names, kept
    merged: dict[int, str] = {}
    for k, names_k in per_round.items():
        for cid, name in names_k.items():
            if merged.setdefault(cid, name) != name:
                raise UsageError(f"rounds of {out} disagree on the name of class id {cid} ({merged[cid]!r}, {name!r}) "
                                 "and batchseg.json does not say which is current; rerun pseudolabel")
    names = tuple(merged.get(cid, f"class_{cid}") for cid in range(max(merged) + 1))
    return names, tables


def _read_predictions(tables: dict[int, pa.Table], image_ids: set[str]) -> _Predictions:
    wanted = pa.array(sorted(image_ids), type=pa.string())
    rows: dict[tuple[int, str], dict[str, list[tuple[int, dict]]]] = {}
    labelled: dict[int, set[str]] = {}
    for k, table in tables.items():
        labelled[k] = set(table.column("image_id").to_pylist()) & image_ids
        semantic = table.filter(pc.equal(table.column("kind"), LabelKind.SEMANTIC))
        for source in set(semantic.column("source").to_pylist()):
            rows[(k, source)] = {}
        mine = semantic.filter(pc.is_in(semantic.column("image_id"), value_set=wanted))
        for row in mine.select(["image_id", "source", "class_id", "mask"]).to_pylist():
            rows[(k, row["source"])].setdefault(row["image_id"], []).append((row["class_id"], row["mask"]))
    return _Predictions(rows, labelled)


def _pred_map(rows: list[tuple[int, dict]], shape: tuple[int, int], num_classes: int, where: str) -> np.ndarray:
    pred = np.full(shape, -1, dtype=np.int64)
    for class_id, rle in rows:
        if not 0 <= class_id < num_classes:
            raise UsageError(f"{where}: label row with class id {class_id} outside the vocabulary")
        mask = decode_mask(rle)
        if mask.shape != shape:
            raise UsageError(f"{where}: label mask is {mask.shape}, the image {shape}; the build is inconsistent")
        pred[mask] = class_id
    return pred


# ---------------------------------------------------------------- the stage


def run_evaluate(config: EvaluateConfig) -> EvaluateReport:
    """Score every round and source of ``config.out`` against the ground truth; write the results.

    Holds the build lock: a build being written (a pseudolabel round half done, an
    ``embed --overwrite``) is never scored; a second run exits at once (75).
    """
    config.validate()
    with build_lock(config.out), recorded_run(config.out, "evaluate", asdict(config)) as run:
        report = _evaluate(config)
        run.add_counts(eval_id=report.eval_id, images_matched=report.images_matched, results=len(report.results),
                       notes=len(report.notes))
        return report


def _evaluate(config: EvaluateConfig) -> EvaluateReport:
    notes: list[str] = []
    tables = {k: read_labels(config.out, k) for k in label_rounds(config.out)}
    tables = {k: t for k, t in tables.items() if t.num_rows}
    if not tables:
        raise UsageError(f"{config.out} has no labels yet; run `batchseg pseudolabel {config.out} --classes ...` first")
    names, tables = _vocabulary(config.out, tables, notes)
    if not tables:
        raise UsageError(f"no round of {config.out} matches its vocabulary; rerun pseudolabel")
    lowered = [name.strip().lower() for name in names]
    background = lowered.index(BACKGROUND) if BACKGROUND in lowered else None

    items = read_ground_truth(config.ground_truth, names, background, notes)
    predictions = _read_predictions(tables, {item.image.image_id for item in items})
    keys = sorted(predictions.rows, key=lambda key: (key[0], SOURCE_ORDER.get(key[1], 9), key[1]))
    if not keys:
        raise UsageError(f"{config.out} has no semantic label rows to evaluate")
    k = len(names)
    conf = {key: np.zeros((k, k + 1), dtype=np.int64) for key in keys}
    counted = {key: 0 for key in keys}
    for item in items:
        gt = item.load()
        for key in keys:
            if item.image.image_id not in predictions.labelled[key[0]]:
                continue
            where = f"round {key[0]} {key[1]} labels of {item.image.path}"
            pred = _pred_map(predictions.rows[key].get(item.image.image_id, []), gt.shape, k, where)
            conf[key] += confusion(pred, gt, k, ignore=IGNORE)
            counted[key] += 1
    if not any(counted.values()):
        raise UsageError(f"none of the {len(items)} matched images has labels in {config.out}; "
                         "run pseudolabel after embedding them")
    results = tuple(SourceResult(key[0], key[1], counted[key], scores_from_confusion(conf[key])) for key in keys)
    if all(r.scores.total_pixels == 0 for r in results):
        notes.append("no ground-truth pixel was scored (all ignored or background without a background class)")

    eval_id = new_run_id()  # the run id format: a UTC timestamp and a short random suffix
    folder = config.out / EVAL_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    report = EvaluateReport(
        eval_id=eval_id, out=config.out, gt=config.gt, gt_format=config.gt_format, class_names=names,
        background_scored=background is not None, images_matched=len(items), results=results,
        notes=tuple(notes), json_path=folder / f"_{eval_id}.json", parquet_path=folder / f"{eval_id}.parquet",
    )
    write_part_atomic(_parquet_table(report), report.parquet_path)
    write_json_atomic(report.json_path, _json(report, config, items))
    return report


def _parquet_table(report: EvaluateReport) -> pa.Table:
    rows = []
    for r in report.results:
        s = r.scores
        for c, name in enumerate(report.class_names):
            rows.append({
                "eval_id": report.eval_id, "round": r.round, "source": r.source, "images": r.images,
                "class_id": c, "class_name": name, "iou": _none_if_nan(s.iou[c]),
                "intersection": int(s.intersection[c]), "union": int(s.union[c]),
                "gt_pixels": int(s.gt_pixels[c]), "pred_pixels": int(s.pred_pixels[c]),
                "miou": _none_if_nan(s.miou), "pixel_accuracy": _none_if_nan(s.pixel_accuracy),
                "unlabelled_pixels": s.unlabelled_pixels, "total_pixels": s.total_pixels,
            })
    return pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)


def _json(report: EvaluateReport, config: EvaluateConfig, items: list[GtItem]) -> dict:
    return {
        "schema": "eval",
        "schema_version": EVAL_VERSION,
        "eval_id": report.eval_id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "out": str(config.out),
        "gt": str(config.gt.resolve()),
        "gt_format": report.gt_format,
        "ignore_index": config.ignore_index if report.gt_format == "png" else None,
        "gt_offset": config.gt_offset if report.gt_format == "png" else None,
        "classes": list(report.class_names),
        "background_scored": report.background_scored,
        "images": [{"gt": item.name, "path": item.image.path, "image_id": item.image.image_id} for item in items],
        "notes": list(report.notes),
        "results": [
            {
                "round": r.round,
                "source": r.source,
                "images": r.images,
                "miou": _none_if_nan(r.scores.miou),
                "pixel_accuracy": _none_if_nan(r.scores.pixel_accuracy),
                "unlabelled_pixels": r.scores.unlabelled_pixels,
                "total_pixels": r.scores.total_pixels,
                "per_class": [
                    {
                        "class_id": c,
                        "class_name": name,
                        "iou": _none_if_nan(r.scores.iou[c]),
                        "intersection": int(r.scores.intersection[c]),
                        "union": int(r.scores.union[c]),
                        "gt_pixels": int(r.scores.gt_pixels[c]),
                        "pred_pixels": int(r.scores.pred_pixels[c]),
                    }
                    for c, name in enumerate(report.class_names)
                ],
            }
            for r in report.results
        ],
    }
