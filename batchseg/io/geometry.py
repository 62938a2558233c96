"""Letterbox geometry: longest side resized onto a square canvas, padded bottom/right.

This is SAM's convention (``ResizeLongestSide`` then pad), used for every model so
that one rule maps canvas pixels back to original pixels.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Letterbox:
    """Where an original ``height x width`` image lands on a ``canvas x canvas`` square.

    The image occupies rows ``[0, valid_h)`` and columns ``[0, valid_w)``; the rest
    is padding.
    """

    height: int
    width: int
    canvas: int
    valid_h: int
    valid_w: int

    @property
    def scale(self) -> float:
        return self.canvas / max(self.height, self.width)


def letterbox(height: int, width: int, canvas: int) -> Letterbox:
    """Return the letterbox of an ``height x width`` image on a square ``canvas``.

    Rounds like segment-anything's ``ResizeLongestSide.get_preprocess_shape``
    (``int(x * scale + 0.5)``) so SAM inputs match ``SamPredictor`` exactly, but
    never lets a side reach zero (a 1x5000 strip still has one valid column).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if canvas < 1:
        raise ValueError(f"canvas must be positive, got {canvas}")
    scale = canvas / max(height, width)
    valid_h = max(1, min(canvas, int(height * scale + 0.5)))
    valid_w = max(1, min(canvas, int(width * scale + 0.5)))
    return Letterbox(height=height, width=width, canvas=canvas, valid_h=valid_h, valid_w=valid_w)
