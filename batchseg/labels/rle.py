"""COCO run-length encoding of masks, through pycocotools.

Label rows store masks as COCO RLE in original pixels: ``{"size": [H, W],
"counts": str}``, the compressed string form that COCO JSON and pycocotools
read. We never hand-write RLE: pycocotools is the reference implementation,
so using it keeps our files byte-compatible with every COCO tool.

pycocotools wants column-major (Fortran-order) ``uint8`` arrays and returns
``counts`` as ``bytes``; the helpers here hide both.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict[str, Any]  # {"size": [H, W], "counts": str}


def _as_fortran_u8(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, N)`` bool/0-1 array as Fortran-order uint8."""
    arr = np.asarray(mask)
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"mask must be bool or integer 0/1, got dtype {arr.dtype}")
    if arr.dtype != np.bool_ and arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError("integer masks must hold only 0 and 1")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"mask must be non-empty in both dimensions, got shape {arr.shape}")
    # asfortranarray copies only when needed; astype(uint8) maps True -> 1.
    return np.asfortranarray(arr.astype(np.uint8, copy=False))


def _to_str(rle: dict[str, Any]) -> Rle:
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _to_coco(rle: Rle) -> dict[str, Any]:
    """Our dict (str counts) as the dict pycocotools' C code accepts (bytes counts)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    elif not isinstance(counts, bytes):
        # Uncompressed RLE (list of run lengths) is valid COCO but not what we
        # write; refuse it rather than guess.
        raise TypeError("expected compressed RLE with str or bytes counts")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode_mask(mask: np.ndarray) -> Rle:
    """Encode one ``(H, W)`` bool mask as ``{"size": [H, W], "counts": str}``.

    Any memory order is accepted (C or Fortran); the result depends only on the
    mask's values.
    """
    if np.ndim(mask) != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {np.shape(mask)}")
    return _to_str(mask_utils.encode(_as_fortran_u8(mask)))


def encode_masks(masks: np.ndarray) -> list[Rle]:
    """Encode ``(N, H, W)`` bool masks in one pycocotools call; one RLE per mask."""
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must be 3-D (N, H, W), got shape {arr.shape}")
    if arr.shape[0] == 0:
        return []
    # pycocotools' batch form is (H, W, N), column-major.
    return [_to_str(r) for r in mask_utils.encode(_as_fortran_u8(np.moveaxis(arr, 0, -1)))]


def decode_mask(rle: Rle) -> np.ndarray:
    """Decode an RLE (``counts`` str or bytes) to a C-contiguous ``(H, W)`` bool array."""
    decoded = mask_utils.decode(_to_coco(rle))
    return np.ascontiguousarray(decoded, dtype=np.bool_)


def mask_area(mask: np.ndarray) -> int:
    """Number of foreground pixels (pycocotools ``area``), as a Python int."""
    return int(mask_utils.area(mask_utils.encode(_as_fortran_u8(mask))))


def mask_bbox_xywh(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight bounding box ``(x, y, w, h)`` in pixels (pycocotools ``toBbox``).

    ``x, y`` are the first foreground column/row and ``w, h`` count pixels, so a
    single pixel at (row 2, col 3) is ``(3, 2, 1, 1)``. An empty mask gives
    ``(0, 0, 0, 0)``.
    """
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(_as_fortran_u8(mask)))
    return float(x), float(y), float(w), float(h)


def rle_area(rle: Rle) -> int:
    """Foreground pixel count of an encoded mask, without decoding it."""
    return int(mask_utils.area(_to_coco(rle)))


def rle_bbox_xywh(rle: Rle) -> tuple[float, float, float, float]:
    """Bounding box ``(x, y, w, h)`` of an encoded mask, without decoding it."""
    x, y, w, h = mask_utils.toBbox(_to_coco(rle))
    return float(x), float(y), float(w), float(h)


def encode_label_map(label_map: np.ndarray, ignore: int = -1) -> list[tuple[int, Rle]]:
    """One RLE per class present in an ``(H, W)`` integer label map.

    Rows come in increasing class-id order. Each pixel belongs to exactly one
    class, so the masks are disjoint by construction, and their union is every
    pixel not equal to ``ignore``. Pixels equal to ``ignore`` get no row.

    Args:
        label_map: ``(H, W)`` integer class ids.
        ignore: id meaning "no label" (e.g. -1 or 255).

    Returns:
        ``[(class_id, rle), ...]``; empty if every pixel is ``ignore``.
    """
    lm = np.asarray(label_map)
    if lm.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {lm.shape}")
    if not np.issubdtype(lm.dtype, np.integer):
        raise TypeError(f"label map must hold integer class ids, got dtype {lm.dtype}")
    classes = [int(c) for c in np.unique(lm) if c != ignore]
    # One class at a time: memory stays at one (H, W) mask however many classes.
    return [(c, encode_mask(lm == c)) for c in classes]
