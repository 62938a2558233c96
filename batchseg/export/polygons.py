"""Polygons from masks, for formats that store outlines (YOLO segmentation).

OpenCV traces each connected component's outer boundary and its holes
(``findContours``, two-level hierarchy) and simplifies every outline with
Douglas-Peucker (``approxPolyDP``) to within ``tolerance`` pixels. A hole is joined to
its outline by a zero-width bridge (walk in and back along the same segment), so one
polygon carries a component with holes; filled with the even-odd rule of
``cv2.fillPoly`` (what Ultralytics rasterises YOLO polygons with) the hole stays empty.

Coordinates are pixel centres (pixel ``(x, y)`` is the point ``(x, y)``), the
convention of ``fillPoly``: filling an unsimplified polygon gives the component back
exactly. Small components lose much to a fixed tolerance, so the tolerance is halved
(down to exact) until the polygon keeps ``MIN_IOU`` of its component.
"""
from __future__ import annotations

import cv2
import numpy as np

MIN_IOU = 0.95  # a simplified polygon keeps at least this IoU with its component
_CHUNK_ENTRIES = 1 << 20  # distance-matrix entries computed at a time when bridging (16 MiB)


def mask_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: float = 1.0) -> list[np.ndarray]:
    """One polygon per connected component of ``mask`` (holes bridged in), largest first.

    Args:
        mask: (H, W) bool.
        tolerance: Douglas-Peucker tolerance in pixels (0 keeps every boundary pixel).
        min_area: components with fewer pixels than this are dropped.
    Returns:
        Polygons as (N, 2) float64 arrays of (x, y) pixel-centre coordinates, N >= 3
        (a lone pixel becomes a 3-point polygon on itself).
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    found: list[tuple[int, np.ndarray]] = []
    for index, outer in enumerate(contours):
        if links[index][3] >= 0:
            continue  # a hole: joined to its outline below
        holes, child = [], links[index][2]
        while child >= 0:
            holes.append(contours[child])
            child = links[child][0]
        x, y, w, h = cv2.boundingRect(outer)
        component = _fill([_points(outer)], x, y, w, h) & (m[y : y + h, x : x + w] > 0)
        pixels = int(component.sum())
        if pixels < min_area:
            continue
        found.append((pixels, _simplified(outer, holes, tolerance, component, (x, y, w, h))))
    found.sort(key=lambda item: -item[0])
    return [polygon for _, polygon in found]


def _points(contour: np.ndarray) -> np.ndarray:
    points = contour.reshape(-1, 2).astype(np.float64)
    while len(points) < 3:
        points = np.concatenate([points, points[-1:]])
    return points


def _approx(contour: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance <= 0:
        return _points(contour)
    simplified = cv2.approxPolyDP(contour, float(tolerance), True)
    return _points(simplified if len(simplified) >= 3 else contour)


def _simplified(outer: np.ndarray, holes: list[np.ndarray], tolerance: float, component: np.ndarray,
                box: tuple[int, int, int, int]) -> np.ndarray:
    while True:
        polygon = merge_polygons([_approx(outer, tolerance)] + [_approx(hole, tolerance) for hole in holes])
        if tolerance <= 0:
            return polygon
        drawn = _fill([polygon], *box)
        iou = (drawn & component).sum() / max(1, (drawn | component).sum())
        if iou >= MIN_IOU:
            return polygon
        tolerance = tolerance / 2 if tolerance > 0.25 else 0.0


def _fill(polygons: list[np.ndarray], x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(out, [np.round(p - [x, y]).astype(np.int32) for p in polygons], 1)
    return out > 0


def merge_polygons(polygons: list[np.ndarray]) -> np.ndarray:
    """Join outlines into one by zero-width bridges between their nearest points.

    What Ultralytics' own COCO converter does for an object in pieces (one YOLO line per
    object): walk to the next outline, around it, and back along the same segment. Filled
    even-odd, pieces stay filled and holes stay empty, plus the one-pixel-wide bridges.
    """
    if not polygons:
        raise ValueError("no polygons to merge")
    merged = polygons[0]
    for polygon in polygons[1:]:
        i, j = _nearest(merged, polygon)
        rotated = np.roll(polygon, -j, axis=0)
        merged = np.concatenate([merged[: i + 1], rotated, rotated[:1], merged[i:]])
    return merged


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices of the closest pair of points of ``a`` and ``b``, in bounded memory."""
    best, pair = np.inf, (0, 0)
    rows = max(1, _CHUNK_ENTRIES // max(1, len(b)))
    for start in range(0, len(a), rows):
        block = a[start : start + rows]
        distances = ((block[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        k = int(distances.argmin())
        i, j = divmod(k, distances.shape[1])
        if distances[i, j] < best:
            best, pair = distances[i, j], (start + i, j)
    return pair


def rasterise(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """(H, W) bool: ``polygons`` filled as Ultralytics does (``cv2.fillPoly``, rounded points)."""
    return _fill(polygons, 0, 0, width, height)
