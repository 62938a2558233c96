"""Overlay images a person can open: the image, its labels blended in, and a legend.

Used by the demo and handy for spot checks: `render_overlay` draws one image's
semantic label rows of one round and source.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from batchseg.labels.rle import decode_mask

LEGEND_ROW = 14


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable, well spread colour per class id (golden-ratio hue steps)."""
    hue = (class_id * 0.618033988749895) % 1.0
    h6 = hue * 6
    i, f = int(h6), h6 - int(h6)
    v, s = 235, 0.75
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6]
    return int(r), int(g), int(b)


def render_overlay(image: np.ndarray, rows: list[dict], alpha: float = 0.5) -> Image.Image:
    """Blend semantic label rows onto ``image`` and add a legend of class names below.

    Args:
        image: (H, W, 3) uint8 RGB, original pixels.
        rows: label rows (as in ``labels/round=K``) of one image, one round and source;
            their RLE masks must be (H, W).
        alpha: opacity of the label colours in [0, 1].
    Returns:
        An RGB PIL image of size (W, H + legend height); unlabelled pixels are untouched.
    """
    height, width = image.shape[:2]
    blended = image.astype(np.float32)
    present: list[tuple[int, str, float]] = []
    for row in sorted(rows, key=lambda r: r["class_id"]):
        mask = decode_mask(row["mask"])
        if mask.shape != (height, width):
            raise ValueError(f"mask of size {mask.shape} does not fit an image of size {(height, width)}")
        colour = np.array(class_colour(row["class_id"]), dtype=np.float32)
        blended[mask] = (1 - alpha) * blended[mask] + alpha * colour
        present.append((row["class_id"], row["class_name"], row["score"]))
    legend_h = LEGEND_ROW * max(1, len(present)) + 4
    canvas = Image.new("RGB", (max(width, 160), height + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for line, (class_id, name, score) in enumerate(present):
        y = height + 2 + line * LEGEND_ROW
        draw.rectangle([2, y + 2, 12, y + 12], fill=class_colour(class_id))
        draw.text((16, y), f"{name} ({score:.2f})", fill=(0, 0, 0))
    return canvas


def save_overlay(image: np.ndarray, rows: list[dict], path: Path, alpha: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image, rows, alpha).save(path)
    return path
