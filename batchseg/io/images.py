"""Find image files under a folder, read them, and decode untrusted bytes safely.

Every way an input file can be unusable ends as an :class:`ImageError` whose
``status`` is one of :data:`batchseg.io.statuses.FAILURE_STATUSES` and whose ``message`` is a one-line
explanation, so one bad file is recorded and skipped instead of stopping a batch.

Decoding choices (they affect pixel values, so they are part of the contract):

* Transparent pixels are composited onto **black**: black is what the letterbox
  padding holds, so "nothing here" looks the same whether it came from alpha or
  from padding, and the result equals the premultiplied colour.
* 16-bit samples map to 8 bits by ``round(v / 257)``, the exact inverse of the
  usual ``v * 257`` widening, so no value is clipped.
* 32-bit integer (``I``) samples: negatives clip to 0; the range is the smallest
  of 255, 65535 and 2**31-1 that holds the image's maximum (a file does not say
  its true bit depth, so the values actually used decide) and is scaled to 0..255.
* Float (``F``) samples: if every finite value is <= 1 they are read as 0..1,
  otherwise as 0..255; both are clipped, NaN becomes 0.
* Only the first frame of an animated or multi-page file is decoded.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import re
import stat
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from batchseg.errors import UsageError
from batchseg.io.hashing import sha256_bytes
from batchseg.io.statuses import FAILURE_STATUSES, ImageStatus

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS",
    "DecodedImage", "FoundFile", "ImageError", "content_id", "decode_image", "discover_images",
    "manifest_path", "read_image_bytes",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
_EXTENSIONS_B = frozenset(os.fsencode(e) for e in IMAGE_EXTENSIONS)

#: Largest width*height decoded by default (~179 MP, 537 MB as RGB). It equals the
#: point where Pillow itself refuses (2 * ``Image.MAX_IMAGE_PIXELS``), so the two
#: limits agree; a larger ``max_pixels`` also needs ``Image.MAX_IMAGE_PIXELS`` raised.
DEFAULT_MAX_PIXELS: int = 178_956_970

# Content is sniffed, not trusted from the extension, but only among the formats we
# accept: otherwise a ".jpg" that is really EPS would make Pillow run Ghostscript.
# (Multi-picture camera JPEGs still open: Pillow's JPEG opener turns them into MPO.)
_WANTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF",
               b"GIF89a": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
_BOMB_RE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")

# Plugin registration mutates Pillow's registry on first use; doing it once at
# import keeps concurrent first decodes from racing on it.
Image.init()
_ALLOWED_FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)  # e.g. no WebP codec


class ImageError(Exception):
    """A file that cannot become an image; ``status`` says why, ``message`` says how."""

    def __init__(self, status: ImageStatus | str, message: str) -> None:
        if status not in FAILURE_STATUSES:
            raise ValueError(f"unknown image failure status {status!r}")
        super().__init__(message)
        self.status = ImageStatus(status)
        self.message = message

    def __reduce__(self):  # Exception pickles args only; Dask ships these between workers
        return (type(self), (self.status, self.message))


@dataclass(frozen=True)
class FoundFile:
    """One candidate image found by :func:`discover_images`."""

    path: str | bytes
    rel_path: str
    size: int | None
    mtime: float | None
    status: ImageStatus | None = None  # a failure found while listing (unreadable)
    message: str | None = None


@dataclass(frozen=True)
class DecodedImage:
    """First frame of an image as ``(height, width, 3)`` uint8 RGB, EXIF orientation applied."""

    pixels: np.ndarray
    width: int
    height: int
    frames: int


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _open_path(path_b: bytes) -> str | bytes:
    # A str with surrogate escapes reopens fine but breaks anything that stores it
    # as UTF-8 (JSON, Parquet); such names stay bytes.
    text = os.fsdecode(path_b)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return path_b
    return text


def _stat_failure(entry: os.DirEntry, err: OSError) -> str:
    if entry.is_symlink():
        if err.errno == errno.ELOOP:
            return "unreadable: symbolic link loop (too many levels of symbolic links)"
        if isinstance(err, FileNotFoundError):
            try:
                target = os.readlink(entry.path).decode("utf-8", "backslashreplace")
            except OSError:
                target = "?"
            return f"unreadable: broken symbolic link (target {target!r} does not exist)"
    return f"unreadable: cannot stat file: {_one_line(err.strerror or err)}"


def discover_images(root: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = ()) -> list[FoundFile]:
    """Return every image-extension file under ``root``, sorted by relative path bytes.

    Folders in ``exclude`` (e.g. the build's own output folder when it lies inside the
    source: its report and overlay images are not source images) are never entered.

    Symlinks to files and directories are followed; each directory is entered once
    (keyed by device and inode) so link cycles cannot loop. Names starting with
    ``.`` are skipped. A link that dangles or loops, or a non-regular file (a FIFO
    would block a reader forever), comes back with status ``"unreadable"``.
    Subdirectories that cannot be listed are logged and skipped.

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` if ``root`` is not a folder.
    """
    root_b = os.path.abspath(os.fsencode(os.fspath(root)))
    shown = root_b.decode("utf-8", "backslashreplace")
    try:
        root_st = os.stat(root_b)
    except FileNotFoundError:
        raise FileNotFoundError(f"image folder does not exist: {shown}") from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise NotADirectoryError(f"image folder is not a directory: {shown}")

    visited = {(root_st.st_dev, root_st.st_ino)}
    for folder in exclude:
        try:
            excluded = os.stat(folder)
        except OSError:
            continue  # not created yet: nothing inside it to skip
        visited.add((excluded.st_dev, excluded.st_ino))
    found: list[tuple[bytes, FoundFile]] = []
    stack: list[tuple[bytes, bytes]] = [(root_b, b"")]
    while stack:
        dir_b, rel_dir = stack.pop()
        try:
            with os.scandir(dir_b) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if not rel_dir:  # an unlistable root is the user's problem, not one bad file
                raise OSError(err.errno, f"cannot list image folder {shown}: {err.strerror}") from None
            logger.warning("skipping folder %s: %s",
                           rel_dir.decode("utf-8", "backslashreplace"), err.strerror or err)
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith(b"."):
                continue
            rel = rel_dir + b"/" + name if rel_dir else name
            is_image = os.path.splitext(name)[1].lower() in _EXTENSIONS_B
            try:
                st = entry.stat()  # follows symlinks
            except OSError as err:
                if is_image:
                    found.append((rel, _found(entry.path, rel, None, _stat_failure(entry, err))))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in visited:
                    visited.add(key)
                    subdirs.append((entry.path, rel))
            elif is_image:
                problem = None if stat.S_ISREG(st.st_mode) else "unreadable: not a regular file"
                found.append((rel, _found(entry.path, rel, st, problem)))
        # Reversed so the stack pops subfolders in name order; which alias of a
        # twice-linked folder wins is then deterministic.
        stack.extend(reversed(subdirs))
    found.sort(key=lambda pair: pair[0])
    _check_unique(found)
    return [f for _, f in found]


def manifest_path(rel: bytes) -> str:
    """The manifest's name for a relative path (bytes, as the file system has it).

    A UTF-8 name is itself. Any other name has every backslash doubled and every byte
    that is not UTF-8 written ``\\xNN``: the result stores as UTF-8 (Parquet, JSON), and two
    different names never share one manifest path (plain ``backslashreplace`` gave
    ``b"\\xff\\\\xfe"`` and ``b"\\\\xff\\xfe"`` the same one).
    """
    try:
        return rel.decode("utf-8")
    except UnicodeDecodeError:
        return rel.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _check_unique(found: list[tuple[bytes, FoundFile]]) -> None:
    """Refuse two files whose manifest names coincide (a non-UTF-8 name escaped onto a UTF-8 one)."""
    seen: dict[str, bytes] = {}
    for rel, f in found:
        other = seen.setdefault(f.rel_path, rel)
        if other != rel:
            raise UsageError(f"two files map to the manifest path {f.rel_path!r}: {other!r} and {rel!r} "
                             "(a name that is not UTF-8, escaped); rename one of them")


def _found(path_b: bytes, rel: bytes, st: os.stat_result | None, problem: str | None) -> FoundFile:
    return FoundFile(path=_open_path(path_b), rel_path=manifest_path(rel),
                     size=None if st is None else st.st_size,
                     mtime=None if st is None else st.st_mtime,
                     status=None if problem is None else ImageStatus.UNREADABLE, message=problem)


def read_image_bytes(source: FoundFile | str | bytes | os.PathLike,
                     max_bytes: int | None = None) -> bytes:
    """Read a whole file; a ``FoundFile`` that discovery already failed re-raises that failure.

    Raises ``ImageError`` with ``"unreadable"`` (cannot open or read, not a regular
    file), ``"empty"`` (0 bytes) or ``"too_large"`` (more than ``max_bytes``).
    """
    if isinstance(source, FoundFile):
        if source.status is not None:
            raise ImageError(source.status, source.message or source.status)
        source = source.path
    # O_NONBLOCK so that opening a FIFO returns at once and fstat can refuse it;
    # it changes nothing for regular files.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(source, flags)
    except OSError as err:
        raise ImageError(ImageStatus.UNREADABLE,
                         f"cannot open file: {_one_line(err.strerror or err)}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(ImageStatus.UNREADABLE, "unreadable: not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ImageError(ImageStatus.TOO_LARGE,
                             f"file too large: {st.st_size} bytes > limit {max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:  # the dup keeps `finally` the sole closer
            data = f.read()
    except OSError as err:
        raise ImageError(ImageStatus.UNREADABLE,
                         f"cannot read file: {_one_line(err.strerror or err)}") from err
    finally:
        os.close(fd)
    if not data:
        raise ImageError(ImageStatus.EMPTY, "empty file: 0 bytes")
    return data


def content_id(data: bytes) -> str:
    """SHA-256 hex digest of ``data``: identical files share one id."""
    return sha256_bytes(data)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode untrusted image bytes to RGB; every failure is an :class:`ImageError`.

    The header size is checked against ``max_pixels`` before any pixel is decoded.
    Pillow's own bomb check (2 * ``Image.MAX_IMAGE_PIXELS``) also applies, and its
    ``DecompressionBombWarning``, if the caller's warning filters turn it into an
    exception, counts as ``"too_large"`` too. No Pillow global is changed, so this is
    safe to call from many threads; ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False
    (its default) or truncated files cannot be told apart.
    """
    if not data:
        raise ImageError(ImageStatus.EMPTY, "empty file: 0 bytes")
    try:
        return _decode(data, max_pixels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        match = _BOMB_RE.search(str(err))
        detail = (f"{match[1]} pixels > limit {match[2]} (Pillow's decompression-bomb limit)"
                  if match else _one_line(err))
        raise ImageError(ImageStatus.TOO_LARGE, f"image too large: {detail}") from err
    except UnidentifiedImageError as err:
        kind = _signature(data)
        if kind is None:
            raise ImageError(ImageStatus.NOT_AN_IMAGE,
                             "not an image: cannot identify image file format") from err
        if _cut_short(data, kind):
            raise ImageError(ImageStatus.TRUNCATED,
                             f"truncated file: {kind} header ends early") from err
        raise ImageError(ImageStatus.DECODE_ERROR, f"decode error: corrupt {kind} header") from err
    except MemoryError as err:
        raise ImageError(ImageStatus.TOO_LARGE, "image too large: out of memory while decoding") from err
    except Exception as err:  # noqa: BLE001 - any decoder failure is a per-file failure
        raise _classify(err, data) from err


def _signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for sig, kind in _SIGNATURES.items() if data.startswith(sig)), None)


def _cut_short(data: bytes, kind: str) -> bool:
    """Whether a file that failed to decode is missing its end, judged per format."""
    if kind == "JPEG":
        return b"\xff\xd9" not in data  # no end-of-image marker anywhere
    if kind == "PNG":
        return b"IEND" not in data
    if kind == "GIF":
        return not data.endswith(b";")  # every GIF ends with the 0x3B trailer
    if kind == "WEBP":  # libwebp only says "could not create decoder object"
        return len(data) < int.from_bytes(data[4:8], "little") + 8
    return False  # TIFF states no total length; Pillow's own message has to do


def _classify(err: Exception, data: bytes) -> ImageError:
    text = _one_line(err) or type(err).__name__
    kind = _signature(data)
    if (isinstance(err, EOFError) or (isinstance(err, OSError) and "truncated" in text.lower())
            or (kind is not None and _cut_short(data, kind))):
        return ImageError(ImageStatus.TRUNCATED, f"truncated file: {text}")
    return ImageError(ImageStatus.DECODE_ERROR, f"decode error: {type(err).__name__}: {text}")


def _decode(data: bytes, max_pixels: int) -> DecodedImage:
    with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as im:
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageError(ImageStatus.DECODE_ERROR, f"decode error: image size is {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(ImageStatus.TOO_LARGE, f"image too large: {width}x{height} = "
                             f"{width * height} pixels > limit {max_pixels}")
        frames = max(1, int(getattr(im, "n_frames", 1)))  # counting seeks back to frame 0
        im.load()
        try:
            orientation = im.getexif().get(0x0112, 1)  # the Orientation tag
        except Exception:  # noqa: BLE001 - broken metadata must not lose good pixels
            orientation = 1
        rgb = _orient(_to_rgb(im), orientation)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if not rgb.flags.writeable:
        rgb = rgb.copy()
    return DecodedImage(pixels=rgb, width=rgb.shape[1], height=rgb.shape[0], frames=frames)


# PIL.ImageOps.exif_transpose's geometry, on the final RGB array so any source mode works.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _orient(rgb: np.ndarray, orientation: object) -> np.ndarray:
    op = _ORIENT.get(orientation) if isinstance(orientation, int) else None  # junk tag: as is
    return rgb if op is None else op(rgb)


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def _over_black(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.uint16)  # rounded c * a / 255, no float round trip
    return ((rgba[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return np.asarray(im)
    if mode == "1":
        return _gray(np.asarray(im, dtype=np.uint8) * 255)
    if mode.startswith("I;16"):
        wide = np.asarray(im).astype(np.uint32)
        return _gray((wide + 128) // 257)
    if mode == "I":
        values = np.clip(np.asarray(im).astype(np.int64), 0, None)
        top = int(values.max()) if values.size else 0
        if top > 255:
            full = 65535 if top <= 65535 else 2**31 - 1
            values = (values * 255 + full // 2) // full
        return _gray(values)
    if mode == "F":
        values = np.asarray(im).astype(np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
        return _gray(np.rint(np.clip(values, 0.0, 255.0)))
    if mode == "La":
        return _gray(np.asarray(im)[..., 0])  # premultiplied: already composited on black
    has_alpha = (mode in ("LA", "PA", "RGBA", "RGBa")
                 or (mode in ("P", "L", "RGB") and "transparency" in im.info)
                 or (mode == "P" and im.palette is not None and im.palette.mode == "RGBA"))
    try:
        if has_alpha:
            return _over_black(np.asarray(im.convert("RGBA")))
        if mode == "L":
            return _gray(np.asarray(im))
        return np.asarray(im.convert("RGB"))
    except ValueError as err:
        raise ImageError(ImageStatus.DECODE_ERROR,
                         f"decode error: unsupported pixel mode {mode}: {_one_line(err)}") from err
