"""Atomic writes: the one home of the temporary-name-then-rename pattern.

Every file batchseg publishes whole (Parquet parts, JSON records, weights, checkpoints,
exported labels, report pages) goes through :func:`atomic_path`: the caller writes a hidden
temporary name in the final file's own folder, and only a block that finishes renames it
into place, so a reader (or a rerun after a kill) sees a file whole or not at all, and
a failure leaves the old file as it was. Temporary names are ``.NAME.XXXXXXXX.tmp``,
which readers skip and :func:`remove_temporaries` clears.

Import-light on purpose (standard library only): config, CLI and drivers use it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from PIL import Image

IMAGE_MODES = ("copy", "link", "none")
TEMPORARY_SUFFIX = ".tmp"


def _temporary(path: Path) -> Path:
    """A hidden, unique sibling of ``path`` that :func:`is_temporary` recognises."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}")


def is_temporary(path: Path) -> bool:
    """True for the leftover of an interrupted atomic write (a hidden ``.tmp`` name)."""
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to disk (before a rename commits it)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(final: str | os.PathLike[str], fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it to ``final``.

    Write the file (or symlink) at the yielded path inside the block. When the block
    finishes, the temporary is (optionally fsynced and) renamed over ``final`` in one
    atomic step; when it raises, the temporary is removed and ``final`` is untouched.
    The parent folder is created if needed. ``fsync=True`` for files whose loss after a
    power cut would matter (committed parts, weights, checkpoints).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_with(path: Path, write: Callable[[IO[bytes]], None], fsync: bool = False) -> Path:
    """Call ``write(handle)`` on a temporary file opened for binary writing, then rename it to ``path``."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def write_bytes_atomic(path: Path, data: bytes, fsync: bool = False) -> Path:
    return write_with(path, lambda handle: handle.write(data), fsync=fsync)


def write_text_atomic(path: Path, text: str, fsync: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def json_text(data: Any, default: Callable[[Any], Any] | None = None) -> str:
    """batchseg's JSON file format: 2-space indent, sorted keys, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True, default=default) + "\n"


def write_json_atomic(path: Path, data: Any, default: Callable[[Any], Any] | None = None,
                      fsync: bool = False) -> Path:
    """``data`` as :func:`json_text`, written atomically; ``default`` as in :func:`json.dumps`."""
    return write_text_atomic(path, json_text(data, default), fsync=fsync)


def save_image_atomic(image: Image.Image, path: Path, **params) -> Path:
    """Save a PIL image (format from the suffix) atomically."""
    from PIL import Image

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
        with atomic_path(target) as tmp:
            os.symlink(source, tmp)
        return True
    if target.is_file() and not target.is_symlink() and target.stat().st_size == source.stat().st_size:
        return True
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return True


@contextmanager
def atomic_folder(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to ``final``; on success it replaces ``final``.

    The folder twin of :func:`atomic_path`: fill the yielded folder inside the block.
    When the block finishes, the old ``final`` (if any) moves to a hidden name, the new
    folder is renamed into place and the old one is deleted; a folder cannot be renamed
    over a non-empty one, so this is two renames, and a reader sees the old folder or the
    new one, never a mix. When the block raises, the temporary folder is deleted and
    ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    tmp.mkdir()
    try:
        yield tmp
        old = _temporary(final)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: Path) -> int:
    """Delete leftovers of interrupted atomic writes directly in ``folder``; return how many."""
    return _remove(folder.iterdir() if folder.is_dir() else ())


def remove_temporaries_under(folder: Path) -> int:
    """Delete leftovers of interrupted atomic writes anywhere under ``folder``; return how many."""
    return _remove(folder.rglob(f".*{TEMPORARY_SUFFIX}") if folder.is_dir() else ())


def _remove(paths) -> int:
    count = 0
    for path in paths:
        if is_temporary(path) and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
            count += 1
    return count
