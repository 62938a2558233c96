"""`batchseg evaluate`: measure the pseudo labels of a build against a few hand-labelled images.

Ground truth is either

- a folder of PNG label maps (single channel ``L``/``P``, or 16-bit ``I;16``/``I``),
  read as raw indices (a palette is not applied). A file is matched to a source image
  by its path without extension: ``gt/a/img0001.png`` ↔ ``a/img0001.jpg``; a flat
  folder works too (``gt/img0001.png`` ↔ ``a/img0001.jpg``) as long as the file stem
  names one image. Value ``--ignore-index`` (default 255) is not scored; values below
  ``--gt-offset`` (default 1, VOC style) are background; value ``v >= offset`` is the
  build's class id ``v - offset`` (classes are matched by id); or
- a COCO instance JSON: images matched by ``file_name`` to the images' relative paths
  (leading folders that the build does not have are dropped; a bare file name works
  when it names one image), categories matched to the build's classes by name
  (case-insensitive). Annotations (polygons or RLE, crowd included) are painted in
  file order, later over earlier; pixels of a category that is not in the build's
  vocabulary are not scored; pixels without annotation are background.

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
Results are printed as a table and written to ``OUT/eval/<EVAL_ID>.json`` and
``OUT/eval/<EVAL_ID>.parquet`` (one row per round, source and class), where EVAL_ID is
a UTC timestamp plus a short random suffix, e.g. ``20250101T120000Z-1a2b3c``.
Evaluation only reads the build (it takes no lock); run it after pseudolabel finishes.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from batchseg.config import read_build_file, write_json_atomic
from batchseg.io.build_info import label_rounds
from batchseg.io.lock import build_lock
from batchseg.errors import UsageError
from batchseg.io.tables import (
    SCHEMA_NAME_KEY,
    SCHEMA_VERSION_KEY,
    read_labels,
    read_manifest,
    write_part_atomic,
)
from batchseg.labels.metrics import Scores, confusion, scores_from_confusion
from batchseg.labels.rle import decode_mask

EVAL_FOLDER = "eval"
EVAL_VERSION = 1
BACKGROUND = "background"
PNG_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")
SOURCE_ORDER = {"maskclip": 0, "student": 1, "sam": 2}  # what a round starts from, then SAM's vote on it
_IGNORE = -1  # internal ignore value of mapped ground-truth maps

EVAL_SCHEMA = pa.schema(
    [
        pa.field("eval_id", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("images", pa.int32()),  # images scored for this round and source
        pa.field("class_id", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("iou", pa.float64()),  # null: class absent from the ground truth
        pa.field("intersection", pa.int64()),
        pa.field("union", pa.int64()),
        pa.field("gt_pixels", pa.int64()),
        pa.field("pred_pixels", pa.int64()),
        pa.field("miou", pa.float64()),  # of the round and source (repeated on its rows); null if undefined
        pa.field("pixel_accuracy", pa.float64()),
        pa.field("unlabelled_pixels", pa.int64()),  # scored pixels that no label row covers
        pa.field("total_pixels", pa.int64()),  # scored ground-truth pixels
    ]
).with_metadata({SCHEMA_NAME_KEY: b"eval", SCHEMA_VERSION_KEY: str(EVAL_VERSION).encode()})


@dataclass(frozen=True)
class EvaluateConfig:
    """One `batchseg evaluate` run."""

    out: Path
    gt: Path
    ignore_index: int = 255  # PNG ground truth: value that is not scored
    gt_offset: int = 1  # PNG ground truth: class id k is stored as k + offset; below offset is background

    def validate(self) -> None:
        if not self.out.is_dir():
            raise UsageError(f"output folder {self.out} does not exist; run `batchseg embed SRC {self.out}` first")
        if not self.gt.exists():
            raise UsageError(f"ground truth {self.gt} does not exist")
        if not (self.gt.is_dir() or self.gt.suffix.lower() == ".json"):
            raise UsageError(
                f"--gt must be a folder of PNG label maps or a COCO instance .json file, got {self.gt}"
            )
        if self.gt_offset < 0:
            raise UsageError(f"--gt-offset must be 0 or more, got {self.gt_offset}")

    @property
    def gt_format(self) -> str:
        return "png" if self.gt.is_dir() else "coco"


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
        words = {"maskclip": "MaskCLIP alone", "sam": "MaskCLIP + SAM refinement"}
    else:
        words = {"student": "self-training head", "sam": "head + SAM refinement"}
    return words.get(source, source)


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _none_if_nan(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def new_eval_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# ---------------------------------------------------------------- the build's images


@dataclass(frozen=True)
class _Image:
    path: str  # relative to the source folder, POSIX
    image_id: str
    height: int
    width: int


def _manifest_images(out: Path) -> dict[str, _Image]:
    """The build's current images by relative path (a path's latest manifest row wins)."""
    rows = read_manifest(out).to_pylist()
    if not rows:
        raise UsageError(f"{out} has no images (no manifest rows); run `batchseg embed SRC {out}` first")
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in rows if r["status"] == "ok" and r["image_id"]}
    latest: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["run_id"] or ""):
        latest[row["path"]] = row
    images = {}
    for path, row in latest.items():
        if row["status"] in ("ok", "duplicate") and row["image_id"] in sizes:
            height, width = sizes[row["image_id"]]
            images[path] = _Image(path, row["image_id"], int(height), int(width))
    if not images:
        raise UsageError(f"{out} has no successfully embedded images; nothing to evaluate")
    return images


class _PathIndex:
    """Find the image a ground-truth name refers to: by relative path, dropping leading
    folders the build does not have, else by bare name when it names one image."""

    def __init__(self, images: dict[str, _Image], key: Callable[[str], str]) -> None:
        self.full: dict[str, list[_Image]] = {}
        self.base: dict[str, list[_Image]] = {}
        for path in sorted(images):
            k = key(path)
            self.full.setdefault(k, []).append(images[path])
            self.base.setdefault(PurePosixPath(k).name, []).append(images[path])

    def find(self, name: str, what: str) -> _Image | None:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        parts = tuple(p for p in parts if p not in (".", "/"))
        for start in range(len(parts)):
            found = self.full.get("/".join(parts[start:]))
            if found:
                return self._one(found, what)
        return self._one(self.base.get(parts[-1], []), what) if parts else None

    @staticmethod
    def _one(found: list[_Image], what: str) -> _Image | None:
        if not found:
            return None
        if len({image.image_id for image in found}) > 1:
            names = ", ".join(image.path for image in found[:5])
            raise UsageError(
                f"ground truth {what} matches several different images ({names}); "
                "put it in the same subfolders as its image"
            )
        return found[0]  # several paths with one content: the same image


def _stem(path: str) -> str:
    return str(PurePosixPath(path).with_suffix(""))


# ---------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class _GtItem:
    name: str  # the ground-truth file (PNG) or COCO file_name, for messages and the JSON
    image: _Image
    load: Callable[[], np.ndarray]  # (H, W) int64 build class ids, _IGNORE where not scored


def _check_shape(gt: np.ndarray, image: _Image, name: str) -> None:
    if gt.shape != (image.height, image.width):
        raise UsageError(
            f"ground truth {name} is {gt.shape[1]}x{gt.shape[0]} pixels but its image {image.path} is "
            f"{image.width}x{image.height}; label maps must have the image's size"
        )


def _png_items(config: EvaluateConfig, images: dict[str, _Image], names: tuple[str, ...],
               background: int | None, notes: list[str]) -> list[_GtItem]:
    files = sorted(
        p for p in config.gt.rglob("*")
        if p.is_file() and p.suffix.lower() == ".png"
        and not any(part.startswith(".") for part in p.relative_to(config.gt).parts)
    )
    if not files:
        raise UsageError(f"{config.gt} holds no .png label maps")
    index = _PathIndex(images, _stem)
    items, unmatched, seen = [], [], {}
    for file in files:
        rel = file.relative_to(config.gt).as_posix()
        image = index.find(_stem(rel), rel)
        if image is None:
            unmatched.append(rel)
            continue
        if image.path in seen:
            raise UsageError(f"ground truth files {seen[image.path]} and {rel} both match image {image.path}")
        seen[image.path] = rel
        items.append(_GtItem(rel, image, _png_loader(file, rel, image, config, names, background)))
    _check_matched(items, unmatched, config, "PNG files", notes)
    return items


def _png_loader(file: Path, rel: str, image: _Image, config: EvaluateConfig, names: tuple[str, ...],
                background: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            with Image.open(file) as img:
                if img.mode not in PNG_MODES:
                    raise UsageError(
                        f"ground truth {rel} has mode {img.mode}; expected a single-channel label map "
                        "(L, palette P or 16-bit), whose values are class indices"
                    )
                raw = np.asarray(img).astype(np.int64)
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"cannot read ground truth {rel}: {exc}") from None
        _check_shape(raw, image, rel)
        ignored = raw == config.ignore_index
        gt = raw - config.gt_offset
        gt[raw < config.gt_offset] = _IGNORE if background is None else background
        gt[ignored] = _IGNORE
        bad = (gt >= len(names)) & ~ignored
        if bad.any():
            value = int(raw[bad][0])
            raise UsageError(
                f"ground truth {rel} holds value {value}, which with --gt-offset {config.gt_offset} is class id "
                f"{value - config.gt_offset}, but the build has {len(names)} classes (ids 0..{len(names) - 1}: "
                f"{', '.join(names)}); check --gt-offset and --ignore-index"
            )
        return gt

    return load


def _check_matched(items: list[_GtItem], unmatched: list[str], config: EvaluateConfig, what: str,
                   notes: list[str]) -> None:
    if not items:
        sample = f" (e.g. {', '.join(unmatched[:3])})" if unmatched else ""
        raise UsageError(
            f"none of the {len(unmatched)} {what} in {config.gt} matches an image of {config.out}{sample}; "
            "name each after its image's relative path (a/img1.jpg -> a/img1.png, or file_name a/img1.jpg)"
        )
    if unmatched:
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        notes.append(f"{len(unmatched)} {what} match no image and were skipped: {', '.join(unmatched[:5])}{more}")


def _load_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read COCO JSON {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UsageError(f"{path} is not COCO instance JSON: it needs lists 'images', 'annotations' and 'categories'")
    return data


def _coco_items(config: EvaluateConfig, images: dict[str, _Image], names: tuple[str, ...],
                background: int | None, notes: list[str]) -> list[_GtItem]:
    data = _load_coco(config.gt)
    try:
        by_name = {name.strip().lower(): index for index, name in enumerate(names)}
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        anns: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            if int(ann["category_id"]) not in categories:
                raise UsageError(f"{config.gt}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
            anns.setdefault(int(ann["image_id"]), []).append(ann)
        coco_images = [(int(im["id"]), str(im["file_name"]), im.get("height"), im.get("width")) for im in data["images"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{config.gt} is not valid COCO instance JSON ({type(exc).__name__}: {exc})") from None
    class_of = {cid: by_name.get(name.strip().lower()) for cid, name in categories.items()}
    if not any(v is not None for v in class_of.values()):
        raise UsageError(
            f"no category of {config.gt} ({', '.join(sorted(categories.values())[:10])}) is a class of the build "
            f"({', '.join(names)}); categories are matched by name"
        )
    unknown = sorted(name for cid, name in categories.items() if class_of[cid] is None)
    if unknown:
        notes.append(f"COCO categories not in the vocabulary, their pixels not scored: {', '.join(unknown)}")
    index = _PathIndex(images, lambda p: p)
    items, unmatched, seen = [], [], {}
    for coco_id, file_name, height, width in coco_images:
        image = index.find(file_name, file_name)
        if image is None:
            unmatched.append(file_name)
            continue
        if (height is not None and int(height) != image.height) or (width is not None and int(width) != image.width):
            raise UsageError(
                f"COCO image {file_name} is {width}x{height} pixels but {image.path} is {image.width}x{image.height}"
            )
        if image.path in seen:
            raise UsageError(f"COCO images {seen[image.path]} and {file_name} both match image {image.path}")
        seen[image.path] = file_name
        items.append(_GtItem(file_name, image, _coco_loader(config.gt, file_name, image, anns.get(coco_id, []),
                                                            class_of, background)))
    _check_matched(items, unmatched, config, "COCO images", notes)
    return items


def _coco_loader(gt: Path, file_name: str, image: _Image, anns: list[dict], class_of: dict[int, int | None],
                 background: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        h, w = image.height, image.width
        label = np.full((h, w), _IGNORE if background is None else background, dtype=np.int64)
        for ann in anns:
            mask = _ann_mask(gt, file_name, ann, h, w)
            value = class_of[int(ann["category_id"])]
            label[mask] = _IGNORE if value is None else value
        return label

    return load


def _ann_mask(gt: Path, file_name: str, ann: dict, h: int, w: int) -> np.ndarray:
    seg = ann.get("segmentation")
    where = f"{gt}: annotation {ann.get('id')} of {file_name}"
    try:
        if isinstance(seg, list):
            polygons = [p for p in seg if len(p) >= 6]
            if not polygons:
                return np.zeros((h, w), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
            counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
            rle = {"size": [int(s) for s in seg["size"]], "counts": counts}
        else:
            raise UsageError(f"{where} has no polygon or RLE segmentation")
        if [int(s) for s in rle["size"]] != [h, w]:
            raise UsageError(f"{where} has mask size {rle['size']}, but the image is {h}x{w} (height x width)")
        return mask_utils.decode(rle).astype(bool)
    except UsageError:
        raise
    except Exception as exc:  # pycocotools raises plain Exceptions on malformed input
        raise UsageError(f"{where} has a malformed segmentation ({type(exc).__name__}: {exc})") from None


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
        semantic = table.filter(pc.equal(table.column("kind"), "semantic"))
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
    with build_lock(config.out):
        return _evaluate(config)


def _evaluate(config: EvaluateConfig) -> EvaluateReport:
    notes: list[str] = []
    images = _manifest_images(config.out)
    tables = {k: read_labels(config.out, k) for k in label_rounds(config.out)}
    tables = {k: t for k, t in tables.items() if t.num_rows}
    if not tables:
        raise UsageError(f"{config.out} has no labels yet; run `batchseg pseudolabel {config.out} --classes ...` first")
    names, tables = _vocabulary(config.out, tables, notes)
    if not tables:
        raise UsageError(f"no round of {config.out} matches its vocabulary; rerun pseudolabel")
    lowered = [name.strip().lower() for name in names]
    background = lowered.index(BACKGROUND) if BACKGROUND in lowered else None

    make_items = _png_items if config.gt_format == "png" else _coco_items
    items = make_items(config, images, names, background, notes)
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
            conf[key] += confusion(pred, gt, k, ignore=_IGNORE)
            counted[key] += 1
    if not any(counted.values()):
        raise UsageError(f"none of the {len(items)} matched images has labels in {config.out}; "
                         "run pseudolabel after embedding them")
    results = tuple(SourceResult(key[0], key[1], counted[key], scores_from_confusion(conf[key])) for key in keys)
    if all(r.scores.total_pixels == 0 for r in results):
        notes.append("no ground-truth pixel was scored (all ignored or background without a background class)")

    eval_id = new_eval_id()
    folder = config.out / EVAL_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    report = EvaluateReport(
        eval_id=eval_id, out=config.out, gt=config.gt, gt_format=config.gt_format, class_names=names,
        background_scored=background is not None, images_matched=len(items), results=results,
        notes=tuple(notes), json_path=folder / f"{eval_id}.json", parquet_path=folder / f"{eval_id}.parquet",
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


def _json(report: EvaluateReport, config: EvaluateConfig, items: list[_GtItem]) -> dict:
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
