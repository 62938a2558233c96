"""A synthetic world where the truth is known: flat-coloured shapes on textured backgrounds.

Every sample is a pure function of ``(seed, index)``: an RGB image of a non-square
size, 1..N objects (a shape in a colour, e.g. "red triangle"), some overlapping,
with exact ground truth: a semantic label map, one visible-part mask per object and
a caption. Tests, the demo, the benchmarks and the toy-model training scripts all
draw from here, so nothing needs a download.

Label convention (the one place it is defined):

* Class ``k`` is ``CLASS_NAMES[k]`` = ``f"{colour} {shape}"``, colour-major order.
* Semantic label maps are ``uint8``, VOC style: ``0`` = background (``BACKGROUND``),
  ``k + 1`` = class ``k``, ``255`` = ignore (``IGNORE``). ``render_sample`` never
  emits ignore; ``sample_batch`` uses it for the letterbox padding.
* COCO category ids equal the label values (``k + 1``).
* The pipeline itself works with class ids (``-1`` = unlabelled): convert with
  ``semantic_to_class_ids`` / ``class_ids_to_semantic``.

Objects and masks come from one rasterisation (pixel centre inside the shape, no
anti-aliasing), so every object pixel has the object's exact colour and the
ground truth aligns with the pixels exactly. Geometry is quantised to 1/64 px and
textures avoid transcendental functions on pixel grids, so the bytes do not hinge
on last-ulp differences between maths libraries.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from batchseg.io.geometry import letterbox
from batchseg.labels.rle import encode_mask

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated and far apart (per-channel spread >= 140) so neither each other nor the
# desaturated backgrounds (spread <= 34) can be mistaken for them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
}
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
BACKGROUND = 0
IGNORE = 255

_COLOUR_NAMES = tuple(COLOURS)
_NUMBERS = ("zero", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_Q = 64.0  # geometry grid: 1/64 px, exact in float64


def class_id(colour: str, shape: str) -> int:
    """Class id (index into ``CLASS_NAMES``) of a colour/shape pair."""
    return _COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def semantic_to_class_ids(semantic: np.ndarray, *, background: int = -1, ignore: int = -1) -> np.ndarray:
    """``(H, W)`` uint8 VOC-style map -> ``(H, W)`` int16 class ids (``background``/``ignore`` for 0/255)."""
    sem = np.asarray(semantic)
    out = sem.astype(np.int16) - 1
    out[sem == BACKGROUND] = background
    out[sem == IGNORE] = ignore
    return out


def class_ids_to_semantic(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` integer class ids (``-1`` background, other negatives ignore) -> uint8 VOC-style map."""
    arr = np.asarray(ids)
    out = np.full(arr.shape, IGNORE, dtype=np.uint8)
    out[arr == -1] = BACKGROUND
    valid = (arr >= 0) & (arr < len(CLASS_NAMES))
    out[valid] = (arr[valid] + 1).astype(np.uint8)
    return out


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays elementwise has no truth value
class WorldObject:
    """One visible object. ``mask``: ``(H, W)`` bool, the part left after occlusion."""

    class_id: int
    shape: str
    colour: str
    mask: np.ndarray
    bbox_xywh: tuple[int, int, int, int]  # tight box of ``mask``, pixels (x, y, w, h)

    @property
    def name(self) -> str:
        return CLASS_NAMES[self.class_id]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True, eq=False)
class WorldSample:
    """One rendered sample.

    ``image``: ``(H, W, 3)`` uint8 RGB. ``semantic``: ``(H, W)`` uint8, 0 background,
    ``k + 1`` class ``k``. ``objects``: bottom to top (later ones painted over
    earlier ones); their masks are disjoint and union to ``semantic != 0``.
    """

    image: np.ndarray
    semantic: np.ndarray
    objects: tuple[WorldObject, ...]
    caption: str
    seed: int
    index: int


def caption_for(class_ids: list[int] | tuple[int, ...]) -> str:
    """Deterministic caption from object classes, e.g. ``"a red circle and two blue triangles"``.

    Classes appear in class-id order, so the same contents always get the same words.
    """
    counts = np.bincount(np.asarray(class_ids, dtype=np.int64), minlength=len(CLASS_NAMES))
    parts = []
    for k in np.flatnonzero(counts):
        n = int(counts[k])
        word = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
        parts.append(f"{word} {CLASS_NAMES[k]}{'s' if n > 1 else ''}")
    if not parts:
        return "an empty scene"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


BACKGROUND_KINDS: tuple[str, ...] = ("noise", "stripes", "gradient", "checks")


@dataclass(frozen=True)
class WorldOptions:
    """How a world's samples are drawn; the defaults are the world every model here trained on.

    Attributes:
        min_side, max_side: image height and width are two distinct sizes in this range.
        max_objects: objects per image are 1..max_objects (before placement failures).
        colours, shapes: the subsets of ``COLOURS`` / ``SHAPES`` objects are drawn from
            (class ids stay those of the full ``CLASS_NAMES``).
        backgrounds: the texture kinds drawn from (subset of ``BACKGROUND_KINDS``).
        radius: circumradius range as a fraction of the short side.
        overlap: probability that a new object is placed next to / over an earlier one.
    """

    min_side: int = 64
    max_side: int = 160
    max_objects: int = 5
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    radius: tuple[float, float] = (0.10, 0.26)
    overlap: float = 0.35

    def __post_init__(self) -> None:
        if not 8 <= self.min_side < self.max_side:
            raise ValueError(f"need 8 <= min_side < max_side, got {self.min_side}, {self.max_side}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        for name, chosen, allowed in (("colours", self.colours, tuple(COLOURS)), ("shapes", self.shapes, SHAPES),
                                      ("backgrounds", self.backgrounds, BACKGROUND_KINDS)):
            if not chosen or not set(chosen) <= set(allowed):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {chosen}")
        if not 0 < self.radius[0] <= self.radius[1] <= 0.5:
            raise ValueError(f"radius must satisfy 0 < low <= high <= 0.5, got {self.radius}")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"overlap must be in [0, 1], got {self.overlap}")


# Named variants. "default" trained and tuned everything; the others exist to check that a
# gain holds on a world nobody tuned on (bench/quality.py --variant).
WORLD_VARIANTS: dict[str, WorldOptions] = {
    "default": WorldOptions(),
    # More shapes than colours, larger and more varied image sizes, smaller objects, more of
    # them and more overlap, only the high-frequency textures.
    "crowded": WorldOptions(min_side=96, max_side=288, max_objects=8, colours=("red", "blue"),
                            backgrounds=("stripes", "checks"), radius=(0.07, 0.2), overlap=0.6),
}


def _q(x: float) -> float:
    return round(x * _Q) / _Q


def _background(rng: np.random.Generator, h: int, w: int, kinds: tuple[str, ...] = BACKGROUND_KINDS) -> np.ndarray:
    """``(h, w, 3)`` uint8 muted texture: grey-ish base plus noise, stripes, gradient or checks.

    The pattern shifts all channels together (luminance) and the tint and grain stay
    small, so channel spread is <= 34: never an object colour.
    """
    yy = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float64)[None, :] + 0.5
    base = rng.uniform(85.0, 170.0)
    tint = rng.uniform(-12.0, 12.0, size=3)
    kind = BACKGROUND_KINDS.index(kinds[int(rng.integers(len(kinds)))])
    # Direction from a quantised unit vector: exact arithmetic from here on.
    theta = rng.uniform(0.0, 2.0 * np.pi)
    dx, dy = _q(np.cos(theta)), _q(np.sin(theta))
    if kind == 0:  # smooth value noise, bilinearly upsampled from a coarse grid
        gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
        grid = rng.uniform(-1.0, 1.0, size=(gh + 1, gw + 1))
        fy, fx = yy[:, 0] / h * gh, xx[0] / w * gw
        iy, ix = np.minimum(fy.astype(int), gh - 1), np.minimum(fx.astype(int), gw - 1)
        ty, tx = (fy - iy)[:, None], (fx - ix)[None, :]
        top = grid[iy][:, ix] * (1 - tx) + grid[iy][:, ix + 1] * tx
        bot = grid[iy + 1][:, ix] * (1 - tx) + grid[iy + 1][:, ix + 1] * tx
        pattern = rng.uniform(15.0, 30.0) * (top * (1 - ty) + bot * ty)
    elif kind == 1:  # stripes: triangle wave along a random direction
        period = rng.uniform(5.0, 18.0)
        phase = (xx * dx + yy * dy) / period
        pattern = rng.uniform(8.0, 20.0) * (4.0 * np.abs(phase - np.floor(phase) - 0.5) - 1.0)
    elif kind == 2:  # linear gradient across the image
        t = (xx * dx + yy * dy) / (abs(dx) * w + abs(dy) * h)
        pattern = rng.uniform(20.0, 35.0) * (2.0 * (t - t.min()) / max(np.ptp(t), 1e-9) - 1.0)
    else:  # low-contrast checkerboard
        cell = int(rng.integers(6, 17))
        checks = ((yy.astype(int) // cell + xx.astype(int) // cell) % 2) * 2.0 - 1.0
        pattern = rng.uniform(6.0, 14.0) * checks
    lum = np.broadcast_to(base + pattern, (h, w))
    rgb = np.rint(lum[..., None] + tint).astype(np.int16)
    rgb += rng.integers(-5, 6, size=(h, w, 3), dtype=np.int8)  # per-pixel grain: no region is flat
    return np.clip(rgb, 40, 215).astype(np.uint8)


def _footprint(shape: str, cx: float, cy: float, r: float, angle: float, h: int, w: int) -> np.ndarray:
    """``(h, w)`` bool: pixels whose centre lies in the shape (circumradius ``r``), no anti-aliasing."""
    out = np.zeros((h, w), dtype=bool)
    y0, y1 = max(0, int(cy - r) - 1), min(h, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r) - 1), min(w, int(cx + r) + 2)
    if y0 >= y1 or x0 >= x1:
        return out
    # Only the bounding window is tested: a few hundred pixels instead of the image.
    py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - cy
    px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - cx
    if shape == "circle":
        inside = px * px + py * py <= r * r
    else:
        n = 4 if shape == "square" else 3
        vs = [(_q(r * np.cos(angle + 2 * np.pi * i / n)), _q(r * np.sin(angle + 2 * np.pi * i / n))) for i in range(n)]
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for (ax, ay), (bx, by) in zip(vs, vs[1:] + vs[:1]):  # counter-clockwise: inside = left of every edge
            inside &= (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0
    out[y0:y1, x0:x1] = inside
    return out


def render_sample(
    seed: int, index: int, *, min_side: int | None = None, max_side: int | None = None,
    max_objects: int | None = None, options: WorldOptions | None = None,
) -> WorldSample:
    """Render sample ``index`` of world ``seed``; same arguments -> same arrays.

    Height and width are two distinct sizes in ``[min_side, max_side]`` (never
    square). Objects have a circumradius of 10-26% of the short side; each new one
    is placed (up to 8 tries) so that every earlier object keeps at least half of
    its area visible, and is dropped if no placement works: objects are never
    slivers, but about a third of them are placed touching or over another.
    """
    options = options or WorldOptions()
    overrides = {k: v for k, v in (("min_side", min_side), ("max_side", max_side), ("max_objects", max_objects))
                 if v is not None}
    if overrides:
        options = dataclasses.replace(options, **overrides)
    min_side, max_side = options.min_side, options.max_side
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.choice(np.arange(min_side, max_side + 1), size=2, replace=False))
    image = _background(rng, h, w, options.backgrounds)
    inst = np.full((h, w), -1, dtype=np.int16)  # which placed object owns each pixel
    placed: list[tuple[int, str, str, float, float, float]] = []  # class, shape, colour, cx, cy, r
    full_area: list[int] = []
    visible: list[int] = []
    short = min(h, w)
    min_pixels = 12
    for _ in range(int(rng.integers(1, options.max_objects + 1))):
        shape = options.shapes[int(rng.integers(len(options.shapes)))]
        colour = options.colours[int(rng.integers(len(options.colours)))]
        for _attempt in range(8):
            r = _q(rng.uniform(*options.radius) * short)
            # Equalise areas roughly: a circle of circumradius r is much bigger than a triangle.
            r_eff = _q(r * {"circle": 0.8, "square": 1.0, "triangle": 1.2}[shape])
            angle = rng.uniform(0.0, 2.0 * np.pi)
            if placed and rng.random() < options.overlap:  # deliberately next to / over an earlier object
                _, _, _, ox, oy, orad = placed[int(rng.integers(len(placed)))]
                dist, phi = rng.uniform(0.4, 1.1) * (orad + r_eff), rng.uniform(0.0, 2.0 * np.pi)
                cx, cy = _q(ox + dist * np.cos(phi)), _q(oy + dist * np.sin(phi))
            else:  # anywhere, keeping most of the object inside the image
                cx, cy = _q(rng.uniform(0.6 * r_eff, w - 0.6 * r_eff)), _q(rng.uniform(0.6 * r_eff, h - 0.6 * r_eff))
            fp = _footprint(shape, cx, cy, r_eff, angle, h, w)
            area = int(fp.sum())
            if area < min_pixels:
                continue
            covered = inst[fp]
            lost = np.bincount(covered[covered >= 0], minlength=len(placed))
            if any(v - lo < max(min_pixels, fa / 2) for v, lo, fa in zip(visible, lost, full_area)):
                continue
            visible = [v - int(lo) for v, lo in zip(visible, lost)] + [area]
            full_area.append(area)
            inst[fp] = len(placed)
            image[fp] = COLOURS[colour]
            placed.append((class_id(colour, shape), shape, colour, cx, cy, r_eff))
            break
    semantic = np.zeros((h, w), dtype=np.uint8)
    objects = []
    for j, (k, shape, colour, *_rest) in enumerate(placed):
        mask = inst == j
        if not mask.any():  # cannot happen with the visibility rule, but a hidden object must not be listed
            continue
        semantic[mask] = k + 1
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        bbox = (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
        objects.append(WorldObject(class_id=k, shape=shape, colour=colour, mask=mask, bbox_xywh=bbox))
    caption = caption_for([o.class_id for o in objects])
    return WorldSample(image=image, semantic=semantic, objects=tuple(objects), caption=caption, seed=seed, index=index)


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened): label 255 is (224, 224, 192)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_world(
    folder: Path | str, count: int, seed: int, *, start: int = 0, ground_truth: bool = True,
    palette: bool = True, **kwargs: Any,
) -> list[Path]:
    """Write samples ``start .. start+count-1`` of world ``seed`` under ``folder``; return the image paths.

    Layout (point ``batchseg embed`` at ``folder/images``, not at ``folder``, or the
    label PNGs would be embedded as images too)::

        folder/images/s{seed}_{index:06d}.png   RGB, lossless; same seed -> same bytes
        folder/gt/s{seed}_{index:06d}.png       semantic map, one channel (VOC palette
                                                 unless ``palette=False``); values as above
        folder/gt/instances.json                COCO: images (id = index + 1, file_name =
                                                 the image's name), RLE annotations,
                                                 category id = class id + 1
        folder/gt/captions.jsonl                {"file_name", "image_id", "caption"} per image
        folder/classes.txt                      CLASS_NAMES, one per line (for --vocab)

    The JSON files describe the images of this call only. ``kwargs`` go to ``render_sample``.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(n + "\n" for n in CLASS_NAMES))
    if ground_truth:
        (folder / "gt").mkdir(exist_ok=True)
    pal = _voc_palette() if palette else None
    paths, images, annotations, captions = [], [], [], []
    for index in range(start, start + count):
        s = render_sample(seed, index, **kwargs)
        name = f"s{seed}_{index:06d}.png"
        path = folder / "images" / name
        Image.fromarray(s.image).save(path, format="PNG")
        paths.append(path)
        if not ground_truth:
            continue
        label = Image.fromarray(s.semantic)  # (H, W) uint8 -> mode "L"
        if pal is not None:
            label = label.convert("P")  # values kept; P attaches a colour map for viewers
            label.putpalette(pal)
        label.save(folder / "gt" / name, format="PNG")
        h, w = s.semantic.shape
        images.append({"id": index + 1, "file_name": name, "width": w, "height": h})
        for o in s.objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": o.class_id + 1,
                "segmentation": encode_mask(o.mask), "area": o.area,
                "bbox": [float(v) for v in o.bbox_xywh], "iscrowd": 0,
            })
        captions.append({"file_name": name, "image_id": index + 1, "caption": s.caption})
    if ground_truth:
        categories = [
            {"id": k + 1, "name": n, "supercategory": n.split(" ")[1]} for k, n in enumerate(CLASS_NAMES)
        ]
        coco = {
            "info": {"description": f"batchseg synthetic world, seed {seed}"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories,
        }
        (folder / "gt" / "instances.json").write_text(json.dumps(coco))
        (folder / "gt" / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return paths


def sample_batch(
    seed: int, start: int, count: int, size: int, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Letterboxed training batch: samples ``start .. start+count-1`` of world ``seed``.

    Item ``i`` is ``render_sample(seed, start + i, **kwargs)`` with its longest side
    resized to ``size`` (``batchseg.io.geometry.letterbox``) and placed top-left on a
    ``size x size`` canvas, as the pipeline's models see images.

    Returns:
        images: ``(N, size, size, 3)`` uint8; PIL bicubic (CLIP's preprocessing filter);
            padding is 0. Trainers wanting the pipeline's "mean colour" padding set
            the pixels where ``semantic == IGNORE`` to 0 *after* normalising.
        semantic: ``(N, size, size)`` uint8; nearest-neighbour, 0 background,
            ``k + 1`` class ``k``, ``IGNORE`` (255) on the padding.
        captions: ``N`` strings.
    """
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    semantic = np.full((count, size, size), IGNORE, dtype=np.uint8)
    captions = []
    for i in range(count):
        s = render_sample(seed, start + i, **kwargs)
        h, w = s.semantic.shape
        box = letterbox(h, w, size)
        vw, vh = box.valid_w, box.valid_h
        images[i, :vh, :vw] = np.asarray(Image.fromarray(s.image).resize((vw, vh), Image.Resampling.BICUBIC))
        semantic[i, :vh, :vw] = np.asarray(Image.fromarray(s.semantic).resize((vw, vh), Image.Resampling.NEAREST))
        captions.append(s.caption)
    return images, semantic, captions
