"""Polygons from masks, for formats that store outlines (YOLO segmentation).

OpenCV traces the outer boundary of each connected component (``findContours``) and
simplifies it with Douglas-Peucker (``approxPolyDP``) to within ``tolerance`` pixels.
Coordinates are pixel centres (pixel ``(x, y)`` is the point ``(x, y)``), the
convention of OpenCV's ``fillPoly`` and of Ultralytics, which rasterises YOLO
polygons with it: filling an unsimplified outline gives the mask back, holes aside
(one polygon per object cannot carry holes; they are filled).
"""
from __future__ import annotations

import cv2
import numpy as np


def mask_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: float = 1.0) -> list[np.ndarray]:
    """Outer outlines of the connected components of ``mask``, largest first.

    Args:
        mask: (H, W) bool.
        tolerance: Douglas-Peucker tolerance in pixels (0 keeps every boundary pixel).
        min_area: components whose traced pixel count is below this are dropped.
    Returns:
        Polygons as (N, 2) float64 arrays of (x, y) pixel-centre coordinates, N >= 3
        (a component one pixel thick is traced back and forth and still has N >= 3;
        a lone pixel becomes a 3-point polygon on itself).
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygons: list[tuple[int, np.ndarray]] = []
    for contour in contours:
        pixels = _component_pixels(m, contour)
        if pixels < min_area:
            continue
        simplified = cv2.approxPolyDP(contour, float(tolerance), True) if tolerance > 0 else contour
        points = simplified.reshape(-1, 2).astype(np.float64)
        if len(points) < 3:  # a line or a dot: keep the traced outline instead
            points = contour.reshape(-1, 2).astype(np.float64)
        while len(points) < 3:
            points = np.concatenate([points, points[-1:]])
        polygons.append((pixels, points))
    polygons.sort(key=lambda item: -item[0])
    return [points for _, points in polygons]


def _component_pixels(mask: np.ndarray, contour: np.ndarray) -> int:
    x, y, w, h = cv2.boundingRect(contour)
    filled = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(filled, [contour - np.array([x, y])], 1)
    return int((filled & mask[y : y + h, x : x + w]).sum())


def merge_polygons(polygons: list[np.ndarray]) -> np.ndarray:
    """Join several outlines into one by zero-width bridges between their nearest points.

    What Ultralytics' own COCO converter does for an object in pieces (one YOLO line per
    object): walk to the next outline and back along the same segment, so the filled
    area is the union of the pieces plus the one-pixel-wide bridges.
    """
    if not polygons:
        raise ValueError("no polygons to merge")
    merged = polygons[0]
    for polygon in polygons[1:]:
        distances = ((merged[:, None, :] - polygon[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(distances.argmin()), distances.shape)
        rotated = np.roll(polygon, -j, axis=0)
        merged = np.concatenate([merged[: i + 1], rotated, rotated[:1], merged[i:]])
    return merged


def rasterise(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """(H, W) bool: ``polygons`` filled as Ultralytics does (``cv2.fillPoly``, rounded points)."""
    out = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(out, [np.round(p).astype(np.int32) for p in polygons], 1)
    return out.astype(bool)
