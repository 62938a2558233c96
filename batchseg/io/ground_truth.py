"""Ground truth for `batchseg evaluate`: PNG label maps or COCO instance JSON, checked.

- a folder of PNG label maps (single channel ``L``/``P``, or 16-bit ``I;16``/``I``),
  read as raw indices (a palette is not applied). A file is matched to a source image
  by its path without extension: ``gt/a/img0001.png`` <-> ``a/img0001.jpg``; a flat
  folder works too (``gt/img0001.png`` <-> ``a/img0001.jpg``) as long as the file stem
  names one image. Value ``ignore_index`` is not scored; values below ``gt_offset`` are
  background; value ``v >= offset`` is the build's class id ``v - offset``; or
- a COCO instance JSON: images matched by ``file_name`` to the images' relative paths
  (leading folders that the build does not have are dropped; a bare file name works
  when it names one image), categories matched to the build's classes by name
  (case-insensitive). Annotations (polygons or RLE, crowd included) are painted in
  file order, later over earlier; pixels of a category that is not in the build's
  vocabulary are not scored; pixels without annotation are background.

Ground truth is input from people and other tools, so it is checked before it is used:
files or COCO images that match no image of the build are counted and reported, never
scored; a COCO file whose annotations name images it does not list, repeats an image
id, or gives sizes that are not positive integers is refused; polygons with too many
points, non-finite or far out-of-image coordinates, and RLE counts that do not cover
the image exactly, are refused before anything is rasterised.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from batchseg.errors import UsageError
from batchseg.io.statuses import USABLE_STATUSES, ImageStatus
from batchseg.io.tables import read_manifest

PNG_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")
IGNORE = -1  # internal ignore value of mapped ground-truth maps
MAX_POLYGON_POINTS = 100_000  # per annotation: far past a hand-drawn outline, low enough to rasterise quickly
MAX_SIDE = 1 << 16  # pixels: a COCO image side beyond this is not a photograph's
OUTSIDE = 1.0  # polygon points may lie this many image sizes beyond the image (a drawn edge a bit over)


@dataclass(frozen=True)
class GroundTruthSource:
    """Where the ground truth is and how to read it (PNG options apply to PNG maps only)."""

    path: Path  # a folder of PNG label maps, or a COCO instance .json
    out: Path  # the build it is matched against
    ignore_index: int = 255
    gt_offset: int = 1

    @property
    def format(self) -> str:
        return "png" if self.path.is_dir() else "coco"


def read_ground_truth(source: GroundTruthSource, names: tuple[str, ...], background: int | None,
                      notes: list[str]) -> list["GtItem"]:
    """The ground-truth items matched to the build's current images; notes collect what was skipped."""
    images = manifest_images(source.out)
    reader = png_items if source.format == "png" else coco_items
    return reader(source, images, names, background, notes)


# ---------------------------------------------------------------- the build's images


@dataclass(frozen=True)
class GtImage:
    path: str  # relative to the source folder, POSIX
    image_id: str
    height: int
    width: int


def manifest_images(out: Path) -> dict[str, GtImage]:
    """The build's current images by relative path (a path's latest manifest row wins)."""
    rows = read_manifest(out).to_pylist()
    if not rows:
        raise UsageError(f"{out} has no images (no manifest rows); run `batchseg embed SRC {out}` first")
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in rows if r["status"] == ImageStatus.OK and r["image_id"]}
    latest: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["run_id"] or ""):
        latest[row["path"]] = row
    images = {}
    for path, row in latest.items():
        if row["status"] in USABLE_STATUSES and row["image_id"] in sizes:
            height, width = sizes[row["image_id"]]
            images[path] = GtImage(path, row["image_id"], int(height), int(width))
    if not images:
        raise UsageError(f"{out} has no successfully embedded images; nothing to evaluate")
    return images


class PathIndex:
    """Find the image a ground-truth name refers to: by relative path, dropping leading
    folders the build does not have, else by bare name when it names one image."""

    def __init__(self, images: dict[str, GtImage], key: Callable[[str], str]) -> None:
        self.full: dict[str, list[GtImage]] = {}
        self.base: dict[str, list[GtImage]] = {}
        for path in sorted(images):
            k = key(path)
            self.full.setdefault(k, []).append(images[path])
            self.base.setdefault(PurePosixPath(k).name, []).append(images[path])

    def find(self, name: str, what: str) -> GtImage | None:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        parts = tuple(p for p in parts if p not in (".", "/"))
        for start in range(len(parts)):
            found = self.full.get("/".join(parts[start:]))
            if found:
                return self._one(found, what)
        return self._one(self.base.get(parts[-1], []), what) if parts else None

    @staticmethod
    def _one(found: list[GtImage], what: str) -> GtImage | None:
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
class GtItem:
    name: str  # the ground-truth file (PNG) or COCO file_name, for messages and the JSON
    image: GtImage
    load: Callable[[], np.ndarray]  # (H, W) int64 build class ids, IGNORE where not scored


def _check_shape(gt: np.ndarray, image: GtImage, name: str) -> None:
    if gt.shape != (image.height, image.width):
        raise UsageError(
            f"ground truth {name} is {gt.shape[1]}x{gt.shape[0]} pixels but its image {image.path} is "
            f"{image.width}x{image.height}; label maps must have the image's size"
        )


def png_items(source: GroundTruthSource, images: dict[str, GtImage], names: tuple[str, ...],
               background: int | None, notes: list[str]) -> list[GtItem]:
    files = sorted(
        p for p in source.path.rglob("*")
        if p.is_file() and p.suffix.lower() == ".png"
        and not any(part.startswith(".") for part in p.relative_to(source.path).parts)
    )
    if not files:
        raise UsageError(f"{source.path} holds no .png label maps")
    index = PathIndex(images, _stem)
    items, unmatched, seen = [], [], {}
    for file in files:
        rel = file.relative_to(source.path).as_posix()
        image = index.find(_stem(rel), rel)
        if image is None:
            unmatched.append(rel)
            continue
        if image.path in seen:
            raise UsageError(f"ground truth files {seen[image.path]} and {rel} both match image {image.path}")
        seen[image.path] = rel
        items.append(GtItem(rel, image, _png_loader(file, rel, image, source, names, background)))
    _check_matched(items, unmatched, source, "PNG files", notes)
    return items


def _png_loader(file: Path, rel: str, image: GtImage, source: GroundTruthSource, names: tuple[str, ...],
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
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise UsageError(f"cannot read ground truth {rel}: {exc}") from None
        _check_shape(raw, image, rel)
        ignored = raw == source.ignore_index
        gt = raw - source.gt_offset
        gt[raw < source.gt_offset] = IGNORE if background is None else background
        gt[ignored] = IGNORE
        bad = (gt >= len(names)) & ~ignored
        if bad.any():
            value = int(raw[bad][0])
            raise UsageError(
                f"ground truth {rel} holds value {value}, which with --gt-offset {source.gt_offset} is class id "
                f"{value - source.gt_offset}, but the build has {len(names)} classes (ids 0..{len(names) - 1}: "
                f"{', '.join(names)}); check --gt-offset and --ignore-index"
            )
        return gt

    return load


def _check_matched(items: list[GtItem], unmatched: list[str], source: GroundTruthSource, what: str,
                   notes: list[str]) -> None:
    if not items:
        sample = f" (e.g. {', '.join(unmatched[:3])})" if unmatched else ""
        raise UsageError(
            f"none of the {len(unmatched)} {what} in {source.path} matches an image of {source.out}{sample}; "
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


def coco_items(source: GroundTruthSource, images: dict[str, GtImage], names: tuple[str, ...],
                background: int | None, notes: list[str]) -> list[GtItem]:
    data = _load_coco(source.path)
    try:
        by_name = {name.strip().lower(): index for index, name in enumerate(names)}
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        anns: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            if int(ann["category_id"]) not in categories:
                raise UsageError(f"{source.path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
            anns.setdefault(int(ann["image_id"]), []).append(ann)
        coco_images = [(int(im["id"]), str(im["file_name"]), _side(im, "height", source.path),
                        _side(im, "width", source.path)) for im in data["images"]]
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise UsageError(f"{source.path} is not valid COCO instance JSON ({type(exc).__name__}: {exc})") from None
    listed = [coco_id for coco_id, *_ in coco_images]
    if len(set(listed)) != len(listed):
        repeated = sorted({i for i in listed if listed.count(i) > 1})[:5]
        raise UsageError(f"{source.path} lists image id(s) {repeated} more than once; each COCO image needs its own id")
    orphans = sorted(set(anns) - set(listed))
    if orphans:
        count = sum(len(anns[i]) for i in orphans)
        raise UsageError(f"{source.path}: {count} annotations point at image ids its 'images' list does not have "
                         f"(e.g. {orphans[:5]}); fix the file so every annotation's image_id is listed")
    class_of = {cid: by_name.get(name.strip().lower()) for cid, name in categories.items()}
    if not any(v is not None for v in class_of.values()):
        raise UsageError(
            f"no category of {source.path} ({', '.join(sorted(categories.values())[:10])}) is a class of the build "
            f"({', '.join(names)}); categories are matched by name"
        )
    unknown = sorted(name for cid, name in categories.items() if class_of[cid] is None)
    if unknown:
        notes.append(f"COCO categories not in the vocabulary, their pixels not scored: {', '.join(unknown)}")
    index = PathIndex(images, lambda p: p)
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
        items.append(GtItem(file_name, image, _coco_loader(source.path, file_name, image, anns.get(coco_id, []),
                                                            class_of, background)))
    _check_matched(items, unmatched, source, "COCO images", notes)
    return items


def _coco_loader(gt: Path, file_name: str, image: GtImage, anns: list[dict], class_of: dict[int, int | None],
                 background: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        h, w = image.height, image.width
        label = np.full((h, w), IGNORE if background is None else background, dtype=np.int64)
        for ann in anns:
            mask = _ann_mask(gt, file_name, ann, h, w)
            value = class_of[int(ann["category_id"])]
            label[mask] = IGNORE if value is None else value
        return label

    return load


def _ann_mask(gt: Path, file_name: str, ann: dict, h: int, w: int) -> np.ndarray:
    seg = ann.get("segmentation")
    where = f"{gt}: annotation {ann.get('id')} of {file_name}"
    try:
        if isinstance(seg, list):
            polygons = [p for p in _checked_polygons(seg, h, w, where) if len(p) >= 6]
            if not polygons:
                return np.zeros((h, w), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            _check_counts(seg, h, w, where)
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



def _side(image: dict, key: str, path: Path) -> int | None:
    """A COCO image's height or width: absent, or a positive integer of sane size."""
    value = image.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value != int(value) \
            or not 0 < int(value) <= MAX_SIDE:
        raise UsageError(f"{path}: image {image.get('file_name')!r} has {key} {value!r}; "
                         f"it must be a whole number of pixels from 1 to {MAX_SIDE}")
    return int(value)


def _checked_polygons(seg: list, h: int, w: int, where: str) -> list[list[float]]:
    """COCO polygons as float lists, refused before rasterising when they make no sense."""
    polygons, points = [], 0
    for polygon in seg:
        if not isinstance(polygon, list) or len(polygon) % 2:
            raise UsageError(f"{where} has a polygon that is not a flat list of x, y pairs")
        points += len(polygon) // 2
        if points > MAX_POLYGON_POINTS:
            raise UsageError(f"{where} has more than {MAX_POLYGON_POINTS} polygon points; simplify it")
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in polygon):
            raise UsageError(f"{where} has a polygon coordinate that is not a number")
        coords = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(coords).all():
            raise UsageError(f"{where} has a NaN or infinite polygon coordinate")
        low = -OUTSIDE * np.array([w, h])
        high = (1 + OUTSIDE) * np.array([w, h])
        if ((coords < low) | (coords > high)).any():
            x, y = coords[((coords < low) | (coords > high)).any(axis=1)][0]
            raise UsageError(f"{where} has the polygon point ({x:g}, {y:g}), far outside its {w}x{h} image")
        polygons.append([float(v) for v in polygon])
    return polygons


def _check_counts(seg: dict, h: int, w: int, where: str) -> None:
    """Uncompressed RLE: non-negative whole counts covering exactly the image's pixels."""
    counts = seg["counts"]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise UsageError(f"{where} has RLE counts that are not non-negative whole numbers")
    if sum(counts) != h * w:
        raise UsageError(f"{where} has RLE counts covering {sum(counts)} pixels, but the image has {h * w}")
