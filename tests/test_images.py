"""Tests for batchseg.io.images: discovery, reading, hashing and safe decoding."""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import shutil
import struct
import tempfile
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from batchseg.io.images import (
    DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS,
    DecodedImage, FoundFile, ImageError, content_id, decode_image, discover_images,
    read_image_bytes,
)
from batchseg.io.statuses import FAILURE_STATUSES, ImageStatus

NOBODY = 65534
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --------------------------------------------------------------------------- builders

def enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose IHDR is rewritten (CRC fixed) to claim another size."""
    data = bytearray(enc(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def palette_png(transparency=None) -> bytes:
    im = Image.new("P", (2, 1))
    im.putpalette([*RED, *GREEN])
    im.putpixel((1, 0), 1)
    return enc(im, "PNG") if transparency is None else enc(im, "PNG", transparency=transparency)


def png_with_corrupt_idat() -> bytes:
    data = bytearray(enc(noise(32, 32), "PNG"))
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    for k in range(at + 6, at + 4 + length, 7):
        data[k] ^= 0xFF
    data[at + 4 + length:at + 8 + length] = struct.pack(
        ">I", zlib.crc32(bytes(data[at:at + 4 + length])))
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, GREEN, BLUE)]
    return enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def quadrant_jpeg(orientation: int) -> bytes:
    """40 wide x 20 high, blue with a red top-left 20x10 block, EXIF orientation set."""
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return enc(im, "JPEG", quality=95, exif=exif)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"

# (case id, bytes, expected status, substring of the message)
FAILURES = [
    ("zero_bytes", b"", "empty", "empty file: 0 bytes"),
    ("truncated_jpeg", half(enc(noise(), "JPEG", quality=90)), "truncated", "truncated file: "),
    ("truncated_png", half(enc(noise(), "PNG")), "truncated", "truncated file: "),
    ("truncated_gif", half(enc(noise(), "GIF")), "truncated", "truncated file: "),
    ("truncated_bmp", half(enc(noise(), "BMP")), "truncated", "truncated file: "),
    ("truncated_tiff", half(enc(noise(), "TIFF")), "truncated", "truncated file: "),
    ("truncated_webp", half(enc(noise(), "WEBP")), "truncated", "truncated file: "),
    ("png_header_cut", enc(noise(), "PNG")[:20], "truncated", "truncated file: "),
    ("gif_cut_in_palette", enc(noise(), "GIF")[:100], "truncated", "truncated file: GIF header"),
    ("jpeg_cut_in_tables", enc(noise(), "JPEG")[:100], "truncated", "truncated file: "),
    ("text_renamed_jpg", b"hello, I am a text file\n" * 4, "not_an_image",
     "not an image: cannot identify image file format"),
    ("html", b"<!DOCTYPE html><html><body>404</body></html>", "not_an_image", "not an image"),
    ("eps_not_allowed", EPS, "not_an_image", "not an image"),
    ("png_zero_size", png_claiming_size(0, 0), "decode_error", "decode error: corrupt PNG header"),
    ("png_corrupt_idat", png_with_corrupt_idat(), "decode_error", "broken data stream"),
    ("bomb_header", png_claiming_size(50_000, 50_000), "too_large",
     "image too large: 2500000000 pixels > limit"),
]


@pytest.mark.parametrize("data,status,fragment", [c[1:] for c in FAILURES],
                         ids=[c[0] for c in FAILURES])
def test_bad_input_gives_status_and_one_line_message(data, status, fragment):
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.status == status
    assert fragment in info.value.message
    assert "\n" not in info.value.message and "Traceback" not in info.value.message
    assert str(info.value) == info.value.message


def test_crafted_header_is_valid_png_so_bomb_case_is_real():
    with Image.open(io.BytesIO(png_claiming_size(7, 9))) as im:
        assert im.size == (7, 9)


def test_eps_would_be_opened_by_unrestricted_pillow():
    # Proves the eps case is refused by our format allow-list, not by Pillow.
    with Image.open(io.BytesIO(EPS)) as im:
        assert im.format == "EPS"


def test_own_pixel_limit_checked_from_header():
    data = enc(Image.new("L", (20, 20)), "PNG")
    assert decode_image(data, max_pixels=400).width == 20
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=399)
    assert info.value.status == "too_large"
    assert info.value.message == "image too large: 20x20 = 400 pixels > limit 399"


@pytest.mark.skipif(Image.MAX_IMAGE_PIXELS is None, reason="Pillow bomb check disabled")
def test_pillow_bomb_warning_band():
    side = math.isqrt(int(Image.MAX_IMAGE_PIXELS * 1.5))  # between Pillow's warn and error
    data = png_claiming_size(side, side)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=1000)
    assert info.value.message == (
        f"image too large: {side}x{side} = {side * side} pixels > limit 1000")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as info:
            decode_image(data)
    assert info.value.status == "too_large"


# --------------------------------------------------------------------------- good inputs

def _px(*rows):
    return np.array(rows, dtype=np.uint8)


def _gray_row(*values):
    return np.repeat(np.array([values], dtype=np.uint8)[..., None], 3, axis=2)


def _tiff(array):
    return enc(Image.fromarray(array), "TIFF")


RGBA = Image.fromarray(np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128],
                                  [10, 20, 30, 64]]], dtype=np.uint8), "RGBA")
L_VALUES = np.array([[0, 17, 200, 255]], dtype=np.uint8)

# (case id, bytes, expected pixels (H, W, 3)); exact except where noted lossless-ness allows.
EXACT = [
    ("one_by_one", enc(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), _px([[9, 8, 7]])),
    ("gray_L", enc(Image.fromarray(L_VALUES), "PNG"), _gray_row(0, 17, 200, 255)),
    ("gray_L_with_trns", enc(Image.fromarray(L_VALUES), "PNG", transparency=17),
     _gray_row(0, 0, 200, 255)),
    ("bilevel_1", enc(Image.fromarray(np.array([[0, 1]], dtype=bool)), "PNG"), _gray_row(0, 255)),
    ("png16_I16", enc(Image.fromarray(np.array([[0, 257, 300, 32896, 65280, 65535]],
                                               dtype=np.uint16)), "PNG"),
     _gray_row(0, 1, 1, 128, 254, 255)),
    ("tiff_I32_8bit_range", _tiff(np.array([[0, 100, 255]], dtype=np.int32)), _gray_row(0, 100, 255)),
    ("tiff_I32_16bit_range", _tiff(np.array([[0, 2570, 65535, -5]], dtype=np.int32)),
     _gray_row(0, 10, 255, 0)),
    ("tiff_I32_31bit_range", _tiff(np.array([[0, 70000, 2**31 - 1]], dtype=np.int32)),
     _gray_row(0, 0, 255)),
    ("tiff_F_unit", _tiff(np.array([[0.0, 0.5, 1.0, -0.2]], dtype=np.float32)),
     _gray_row(0, 128, 255, 0)),
    ("tiff_F_bytes", _tiff(np.array([[0.0, 100.4, 300.0, np.nan]], dtype=np.float32)),
     _gray_row(0, 100, 255, 0)),
    ("palette_P", palette_png(), _px([RED, GREEN])),
    ("palette_P_trns_index", palette_png(transparency=1), _px([RED, (0, 0, 0)])),
    ("palette_P_trns_alpha", palette_png(transparency=bytes([255, 128])),
     _px([RED, (0, 128, 0)])),
    ("rgba_over_black", enc(RGBA, "PNG"),
     _px([(200, 100, 50), (0, 0, 0), (100, 50, 25), (3, 5, 8)])),
    ("la_over_black", enc(Image.fromarray(np.array([[[200, 128], [50, 255]]], np.uint8), "LA"),
                          "PNG"), _gray_row(100, 50)),
    ("rgb_trns", enc(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG", transparency=(1, 2, 3)),
     _px([(0, 0, 0)])),
    ("lab_tiff", enc(Image.new("LAB", (1, 1), (128, 128, 128)), "TIFF"), _px([(119, 119, 119)])),
    ("cmyk_tiff", enc(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), "TIFF"), _px([RED])),
    ("ycbcr_tiff", enc(Image.new("YCbCr", (1, 1), (76, 85, 255)), "TIFF"), _px([(254, 0, 0)])),
    ("webp_lossless", enc(Image.new("RGB", (2, 2), (1, 2, 3)), "WEBP", lossless=True),
     np.full((2, 2, 3), (1, 2, 3), np.uint8)),
    ("bmp", enc(noise(5, 7), "BMP"), np.asarray(noise(5, 7))),
    ("tiff_rgb", enc(noise(5, 7), "TIFF"), np.asarray(noise(5, 7))),
    ("animated_gif_first_frame", animated_gif(), np.full((4, 4, 3), RED, np.uint8)),
]


@pytest.mark.parametrize("data,expected", [c[1:] for c in EXACT], ids=[c[0] for c in EXACT])
def test_modes_convert_to_expected_rgb(data, expected):
    out = decode_image(data)
    assert isinstance(out, DecodedImage)
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == expected.shape
    assert out.pixels.flags.c_contiguous and out.pixels.flags.writeable
    assert (out.height, out.width) == expected.shape[:2]
    np.testing.assert_array_equal(out.pixels, expected)


@pytest.mark.parametrize("case,mode", [("png16_I16", "I;16"), ("tiff_I32_16bit_range", "I"),
                                       ("tiff_F_unit", "F"), ("palette_P_trns_index", "P"),
                                       ("lab_tiff", "LAB"), ("ycbcr_tiff", "YCbCr")])
def test_exact_cases_really_exercise_the_mode(case, mode):
    data = dict((c[0], c[1]) for c in EXACT)[case]
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode


def test_frames_counted_first_frame_used():
    out = decode_image(animated_gif())
    assert out.frames == 3
    assert decode_image(enc(noise(4, 4), "PNG")).frames == 1


def test_cmyk_jpeg_is_red():
    data = enc(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    px = decode_image(data).pixels.astype(int)
    assert np.abs(px - RED).max() <= 8


@pytest.mark.parametrize("width,height", [(1, 5000), (5000, 1), (1, 1)])
def test_extreme_aspect_ratios(width, height):
    out = decode_image(enc(Image.new("RGB", (width, height), (5, 6, 7)), "PNG"))
    assert (out.width, out.height) == (width, height)
    assert out.pixels.shape == (height, width, 3)


def test_exif_orientation_6_rotates_clockwise():
    out = decode_image(quadrant_jpeg(6))
    assert (out.width, out.height) == (20, 40)
    px = out.pixels.astype(int)
    assert np.abs(px[3, 16] - RED).max() < 40    # red block moved to the top-right
    assert np.abs(px[3, 3] - BLUE).max() < 40
    assert np.abs(px[36, 16] - BLUE).max() < 40


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_exif_transpose(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = enc(noise(3, 5, seed=orientation), "PNG", exif=exif)
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    out = decode_image(data)
    np.testing.assert_array_equal(out.pixels, expected)
    assert (out.height, out.width) == expected.shape[:2]


# --------------------------------------------------------------------------- robustness

@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt TIFF tags
def test_fuzzed_inputs_only_ever_raise_image_error():
    rng = np.random.default_rng(42)
    seen = set()
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        good = enc(noise(24, 20, seed=1), fmt)
        variants = [good[:cut] for cut in range(1, len(good), max(1, len(good) // 15))]
        for _ in range(25):
            bad = bytearray(good)
            for at in rng.integers(0, len(bad), 3):
                bad[at] = rng.integers(0, 256)
            variants.append(bytes(bad))
        for data in variants:
            try:
                out = decode_image(data)
            except ImageError as err:
                assert err.status in FAILURE_STATUSES and "\n" not in err.message
                seen.add(err.status)
            else:
                assert out.pixels.dtype == np.uint8 and out.pixels.ndim == 3
    assert {"truncated", "decode_error"} <= seen
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def _outcome(data: bytes, max_pixels: int):
    try:
        out = decode_image(data, max_pixels=max_pixels)
    except ImageError as err:
        return err.status, err.message
    return ImageStatus.OK, content_id(out.pixels.tobytes())


def test_concurrent_decodes_match_sequential():
    jobs = [(c[1], DEFAULT_MAX_PIXELS) for c in FAILURES + EXACT]
    # Same bytes, different limits at the same time: the limit must not be shared state.
    jobs += [(enc(noise(), "PNG"), 64 * 48), (enc(noise(), "PNG"), 64 * 48 - 1)] * 8
    expected = [_outcome(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda job: _outcome(*job), jobs * 3))
    assert got == expected * 3
    assert expected[-2][0] == ImageStatus.OK and expected[-1][0] == "too_large"


# --------------------------------------------------------------------------- small API

def test_constants():
    assert FAILURE_STATUSES == {"empty", "truncated", "not_an_image", "too_large",
                                "unreadable", "decode_error", "changed"}
    assert ImageStatus.OK == "ok" and ImageStatus.DUPLICATE == "duplicate"
    assert ImageStatus.OK not in FAILURE_STATUSES and ImageStatus.DUPLICATE not in FAILURE_STATUSES
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    assert DEFAULT_MAX_PIXELS == 178_956_970


@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 100])
def test_content_id_is_sha256(data):
    assert content_id(data) == hashlib.sha256(data).hexdigest()


def test_content_id_known_vector():
    assert content_id(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_image_error_pickles_and_validates_status():
    err = pickle.loads(pickle.dumps(ImageError("truncated", "truncated file: x")))
    assert (err.status, err.message, str(err)) == ("truncated", "truncated file: x",
                                                   "truncated file: x")
    with pytest.raises(ValueError):
        ImageError("exploded", "nope")


# --------------------------------------------------------------------------- reading

def test_read_accepts_every_path_form(tmp_path):
    data = enc(noise(4, 4), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    (found,) = discover_images(tmp_path)
    for source in (found, str(path), path, os.fsencode(path)):
        assert read_image_bytes(source) == data


@pytest.mark.parametrize("make,status,message", [
    (lambda p: p.write_bytes(b""), "empty", "empty file: 0 bytes"),
    (lambda p: None, "unreadable", "cannot open file: No such file or directory"),
    (lambda p: p.mkdir(), "unreadable", "unreadable: not a regular file"),
    (lambda p: os.mkfifo(p), "unreadable", "unreadable: not a regular file"),
])
def test_read_failures(tmp_path, make, status, message):
    target = tmp_path / "x.png"
    make(target)
    with pytest.raises(ImageError) as info:
        read_image_bytes(target)  # a FIFO must not block here
    assert (info.value.status, info.value.message) == (status, message)


def test_read_max_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 100)
    assert len(read_image_bytes(tmp_path / "a.png", max_bytes=100)) == 100
    with pytest.raises(ImageError) as info:
        read_image_bytes(tmp_path / "a.png", max_bytes=99)
    assert info.value.message == "file too large: 100 bytes > limit 99"


def _as_nobody(fn):
    """Run ``fn()`` in a forked child that dropped root to nobody; return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result = ("ok", fn())
            except BaseException as err:  # report, do not lose, the child's failure
                result = ("raised", repr(err))
            with os.fdopen(write_fd, "wb") as pipe:
                pickle.dump(result, pipe)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(payload)


@pytest.fixture
def shared_dir(tmp_path):
    """A folder nobody can traverse when tests run as root (tmp_path's parents are 0700)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="batchseg-perm-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _read_status(path):
    try:
        return "read", len(read_image_bytes(path))
    except ImageError as err:
        return err.status, err.message


def _maybe_as_nobody(fn):
    if os.geteuid() == 0:
        kind, value = _as_nobody(fn)
        assert kind == "ok", value
        return value
    return fn()


def test_permission_denied_is_unreadable(shared_dir):
    data = enc(noise(4, 4), "PNG")
    for name in ("ok.png", "secret.png"):
        (shared_dir / name).write_bytes(data)
        os.chmod(shared_dir / name, 0o644)
    os.chmod(shared_dir / "secret.png", 0)
    if os.geteuid() != 0 and os.access(shared_dir / "secret.png", os.R_OK):
        pytest.skip("this account can read mode-000 files")
    assert _maybe_as_nobody(lambda: _read_status(str(shared_dir / "ok.png"))) == ("read", len(data))
    assert _maybe_as_nobody(lambda: _read_status(str(shared_dir / "secret.png"))) == (
        "unreadable", "cannot open file: Permission denied")


def test_unlistable_subfolder_is_skipped(shared_dir):
    (shared_dir / "good.png").write_bytes(b"x")
    (shared_dir / "locked").mkdir()
    (shared_dir / "locked" / "hidden_from_us.png").write_bytes(b"x")
    for p in (shared_dir / "good.png", shared_dir / "locked" / "hidden_from_us.png"):
        os.chmod(p, 0o644)
    os.chmod(shared_dir / "locked", 0)
    if os.geteuid() != 0 and os.access(shared_dir / "locked", os.R_OK):
        pytest.skip("this account can list mode-000 folders")
    try:
        rels = _maybe_as_nobody(lambda: [f.rel_path for f in discover_images(shared_dir)])
    finally:
        os.chmod(shared_dir / "locked", 0o755)
    assert rels == ["good.png"]
    # Control: once listable, the same tree yields both files.
    assert _rels(shared_dir) == ["good.png", "locked/hidden_from_us.png"]


# --------------------------------------------------------------------------- discovery

def _touch(root: Path, *names: str, data: bytes = b"x") -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _rels(root) -> list[str]:
    return [f.rel_path for f in discover_images(root)]


def test_discovery_filters_and_orders(tmp_path):
    _touch(tmp_path, "b.png", "aa.png", "a/c.png", "Z.jpg", "a.png", "A.png", "up.JPG",
           "mixed.JpEg", "scan.TIFF", "s/t.tif", "w.webp", "x.bmp", "y.gif",
           ".hidden.png", ".git/x.png", "notes.txt", "a.png.bak", "png", "x.jpgx")
    expected = ["A.png", "Z.jpg", "a.png", "a/c.png", "aa.png", "b.png", "mixed.JpEg",
                "s/t.tif", "scan.TIFF", "up.JPG", "w.webp", "x.bmp", "y.gif"]
    assert _rels(tmp_path) == expected
    assert _rels(tmp_path) == expected  # stable across calls


def test_found_file_fields(tmp_path):
    _touch(tmp_path, "sub/a.png", data=b"12345")
    (found,) = discover_images(tmp_path)
    st = os.stat(tmp_path / "sub" / "a.png")
    assert found == FoundFile(path=str(tmp_path / "sub" / "a.png"), rel_path="sub/a.png",
                              size=5, mtime=st.st_mtime, status=None, message=None)


def test_relative_and_symlinked_roots_give_absolute_paths(tmp_path, monkeypatch):
    _touch(tmp_path, "imgs/a.png")
    os.symlink(tmp_path / "imgs", tmp_path / "alias")
    monkeypatch.chdir(tmp_path)
    assert [f.path for f in discover_images("imgs")] == [str(tmp_path / "imgs" / "a.png")]
    assert [f.path for f in discover_images(Path("alias"))] == [str(tmp_path / "alias" / "a.png")]


def test_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder does not exist: .*nope"):
        discover_images(tmp_path / "nope")
    _touch(tmp_path, "file.png")
    with pytest.raises(NotADirectoryError, match="not a directory: .*file.png"):
        discover_images(tmp_path / "file.png")


def test_file_symlink_loop_and_dangling_link_are_unreadable(tmp_path):
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    os.symlink("missing.png", tmp_path / "d.png")
    os.symlink("missing", tmp_path / "no_extension")  # not an image name: not reported
    found = discover_images(tmp_path)
    assert [(f.rel_path, f.status, f.size, f.mtime) for f in found] == [
        ("a.jpg", "unreadable", None, None), ("b.jpg", "unreadable", None, None),
        ("d.png", "unreadable", None, None)]
    assert "symbolic link loop" in found[0].message
    assert found[2].message == (
        "unreadable: broken symbolic link (target 'missing.png' does not exist)")
    with pytest.raises(ImageError) as info:
        read_image_bytes(found[0])
    assert (info.value.status, info.value.message) == ("unreadable", found[0].message)


def test_fifo_is_reported_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (found,) = discover_images(tmp_path)
    assert (found.status, found.message) == ("unreadable", "unreadable: not a regular file")


def test_directory_symlink_loop_terminates_and_finds_once(tmp_path):
    _touch(tmp_path, "x.png", "sub/y.png")
    os.symlink("..", tmp_path / "sub" / "up")
    os.symlink(".", tmp_path / "sub" / "self")
    result = []
    worker = threading.Thread(target=lambda: result.append(_rels(tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "discovery did not terminate on a symlink loop"
    assert result == [["sub/y.png", "x.png"]]


def test_symlinks_are_followed(tmp_path):
    outside = tmp_path / "outside"
    _touch(outside, "o.png")
    root = tmp_path / "root"
    _touch(root, "real.png")
    os.symlink(outside, root / "l1")
    os.symlink(outside, root / "l2")  # same folder twice: entered once, first name wins
    os.symlink("real.png", root / "alias.png")
    found = discover_images(root)
    assert [f.rel_path for f in found] == ["alias.png", "l1/o.png", "real.png"]
    assert all(f.status is None for f in found)
    assert read_image_bytes(found[0]) == b"x"


def test_non_utf8_names_are_reopenable(tmp_path):
    root_b = os.fsencode(tmp_path)
    data = enc(noise(3, 3), "PNG")
    try:
        os.mkdir(os.path.join(root_b, b"d\xfe"))
        for rel in (b"bad\xff.png", b"d\xfe/x.png"):
            with open(os.path.join(root_b, rel), "wb") as f:
                f.write(data)
    except OSError:
        pytest.skip("this file system rejects non-UTF-8 names")
    (tmp_path / "café.png").write_bytes(data)
    found = discover_images(tmp_path)
    assert [f.rel_path for f in found] == ["bad\\xff.png", "caf\u00e9.png", "d\\xfe/x.png"]
    assert found[0].path == os.path.join(root_b, b"bad\xff.png")
    assert found[1].path == str(tmp_path / "café.png")
    assert isinstance(found[2].path, bytes)
    for f in found:
        f.rel_path.encode("utf-8")  # storable as-is
        assert decode_image(read_image_bytes(f)).pixels.shape == (3, 3, 3)


def test_corpus_through_the_whole_pipeline(tmp_path):
    """Every corpus file goes discover -> read -> decode and ends in its expected status."""
    expected = {}
    for name, data, status, _ in FAILURES:
        _touch(tmp_path, f"bad/{name}.jpg", data=data)
        expected[f"bad/{name}.jpg"] = status
    for name, data, _ in EXACT:
        _touch(tmp_path, f"good/{name}.png", data=data)
        expected[f"good/{name}.png"] = ImageStatus.OK
    os.symlink("loop2.jpg", tmp_path / "loop1.jpg")
    os.symlink("loop1.jpg", tmp_path / "loop2.jpg")
    expected.update({"loop1.jpg": "unreadable", "loop2.jpg": "unreadable"})
    got = {}
    for found in discover_images(tmp_path):
        try:
            decode_image(read_image_bytes(found))
        except ImageError as err:
            got[found.rel_path] = err.status
        else:
            got[found.rel_path] = ImageStatus.OK
    assert got == expected
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def _write_names(root: Path, names: list[bytes], data: bytes) -> None:
    root_b = os.fsencode(root)
    try:
        for name in names:
            with open(os.path.join(root_b, name), "wb") as f:
                f.write(data)
    except OSError:
        pytest.skip("this file system rejects non-UTF-8 names")


@pytest.mark.parametrize("names", [
    [b"a\xff\\xfe.png", b"a\\xff\xfe.png"],  # plain backslashreplace gave both "a\\xff\\xfe.png"
    [b"\xff\\\\.png", b"\\\xff\\.png"],
    [b"x\xff.png", b"x\xfe.png", b"x\xff\xfe.png", "x\u00ff.png".encode()],  # the last is UTF-8: itself
])
def test_different_names_never_share_a_manifest_path(tmp_path, names):
    from batchseg.io.images import manifest_path

    _write_names(tmp_path, names, enc(noise(3, 3), "PNG"))
    found = discover_images(tmp_path)
    paths = [f.rel_path for f in found]
    assert len(paths) == len(set(paths)) == len(names)
    assert sorted(paths) == sorted(manifest_path(n) for n in names)
    for f in found:
        f.rel_path.encode("utf-8")
        assert decode_image(read_image_bytes(f)).pixels.shape == (3, 3, 3)


def test_a_name_escaped_onto_another_is_refused(tmp_path):
    from batchseg.errors import UsageError

    # not UTF-8, escaped to "y\\xff.png"; and a UTF-8 name that is literally "y\\xff.png"
    _write_names(tmp_path, [b"y\xff.png", b"y\\xff.png"], enc(noise(3, 3), "PNG"))
    with pytest.raises(UsageError, match="rename one of them"):
        discover_images(tmp_path)
