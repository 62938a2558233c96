"""Atomic writes of plain files (exported label files, images, report pages).

Each file is written under a hidden temporary name in its own folder and renamed into
place, so a reader (or a rerun after a kill) sees a file whole or not at all.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Callable

from PIL import Image

IMAGE_MODES = ("copy", "link", "none")


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_with(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary file, then rename it to ``path``."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return write_with(path, lambda handle: handle.write(data))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_image_atomic(image: Image.Image, path: Path, **params) -> Path:
    """Save a PIL image (format from the suffix) atomically."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    return write_with(path, lambda handle: image.save(handle, format=fmt, **params))


def place_image(source: Path, target: Path, mode: str) -> bool:
    """Put ``source`` at ``target`` by ``mode`` (copy, link = symlink, none); True if placed.

    An existing target that already is the same file (size, or the same link) is kept,
    so reruns do not copy again.
    """
    if mode == "none":
        return False
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {IMAGE_MODES}, got {mode!r}")
    source = source.resolve()
    if mode == "link":
        if target.is_symlink() and Path(os.readlink(target)) == source:
            return True
        tmp = _temporary(target)
        os.symlink(source, tmp)
        os.replace(tmp, target)
        return True
    if target.is_file() and not target.is_symlink() and target.stat().st_size == source.stat().st_size:
        return True
    tmp = _temporary(target)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def remove_temporaries_under(folder: Path) -> int:
    """Delete leftovers of interrupted atomic writes anywhere under ``folder``."""
    count = 0
    if folder.is_dir():
        for path in folder.rglob(".*.tmp"):
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
                count += 1
    return count
