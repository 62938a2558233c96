"""`batchseg embed` end to end through the CLI on small generated folders."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from batchseg.io.images import content_id, decode_image
from batchseg.io.lock import build_lock
from batchseg.io.tables import read_manifest
from batchseg.models.clip import ClipSpec, load_dense_clip, preprocess_clip
from batchseg.models.dense_heads import DenseHeadSettings, compute_head
from batchseg.models.sam import SamEncoder, SamSpec, load_sam
from batchseg.testing import write_image_folder
from helpers import assert_same_build, embed_args, manifest_rows, run_cli


def _embed(src, out, models, scheduler, *extra):
    return run_cli(embed_args(src, out, models, "--scheduler", scheduler, *extra))


def test_embed_writes_arrays_manifest_and_summary(image_folder, tmp_path, tiny_models, dask_scheduler):
    out = tmp_path / "out"
    result = _embed(image_folder, out, tiny_models, dask_scheduler)
    assert result.exit_code == 0, result.output
    assert "8 ok, 0 failed, 0 skipped (unchanged), 0 duplicates; 8 computed" in result.output
    assert str(out / "embeddings.zarr") in result.output

    rows = read_manifest(out).to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert sorted(r["zarr_row"] for r in rows) == list(range(8))
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    shapes = {name: group[name].shape for name in group.array_keys()}
    assert shapes == {"clip_tokens": (8, 64, 8, 8), "clip_cls": (8, 64), "clip_global": (8, 32), "sam": (8, 32, 16, 16),
                      "image_id": (8, 32)}
    assert all(group[name].chunks[0] == 1 and group[name].dtype == np.float16 for name in shapes if name != "image_id")
    # every row records the image it holds (the SHA-256 digest of its bytes)
    assert {bytes(group["image_id"][r["zarr_row"]]).hex() for r in rows} == {r["image_id"] for r in rows}

    # Values: each row equals the models run directly on that file's decoded image.
    clip = load_dense_clip(ClipSpec(tiny_models.clip_option), canvas=64).eval()
    sam = SamEncoder(load_sam(SamSpec("tiny", str(tiny_models.sam_checkpoint)))).eval()
    for row in rows:
        data = (image_folder / row["path"]).read_bytes()
        assert row["image_id"] == content_id(data)
        image = decode_image(data)
        assert (row["width"], row["height"]) == (image.width, image.height)
        scale = 64 / max(image.width, image.height)
        assert row["clip_valid_w"] == max(1, int(image.width * scale + 0.5))
        with torch.no_grad():
            pixels = preprocess_clip(image.pixels, 64, clip.mean, clip.std)[None]
            expected = clip.encode_tokens(pixels)
            full = clip(pixels)  # the whole model's MaskCLIP forward
            expected_sam = sam(sam.preprocess(image.pixels)[None])
        r = row["zarr_row"]
        tokens = group["clip_tokens"][r].astype(np.float32)
        np.testing.assert_allclose(tokens, expected.tokens[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(group["clip_cls"][r].astype(np.float32), expected.cls[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(group["clip_global"][r].astype(np.float32), expected.global_[0].numpy(), rtol=2e-3, atol=2e-3)
        # Store -> head equals the full-model forward within fp16 storage tolerance.
        with torch.no_grad():
            head = compute_head(clip, DenseHeadSettings("maskclip"), torch.from_numpy(tokens)[None])
        torch.testing.assert_close(head.dense, full.dense, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(head.keys, full.keys, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(group["sam"][r].astype(np.float32), expected_sam[0].numpy(), rtol=2e-3, atol=2e-3)

    runs = list((out / "runs").glob("*.json"))
    assert len(runs) == 1 and '"status": "finished"' in runs[0].read_text()


def test_bad_inputs_become_rows_and_good_images_are_untouched(tmp_path, tiny_models, dask_scheduler):
    from test_images import animated_gif, enc, half, noise, palette_png, png_claiming_size, quadrant_jpeg

    src = tmp_path / "src"
    write_image_folder(src, 2, seed=3)
    good = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*.*")}
    corpus = {
        "empty.jpg": b"",
        "text.jpg": b"hello, not an image\n",
        "cut.jpg": half(enc(noise(), "JPEG", quality=90)),
        "bomb.png": png_claiming_size(50_000, 50_000),
        "cmyk.jpg": enc(Image.new("CMYK", (20, 10), (0, 255, 0, 0)), "JPEG"),
        "sixteen.png": enc(Image.fromarray(np.full((6, 9), 40000, dtype=np.uint16)), "PNG"),
        "palette.png": palette_png(transparency=0),
        "rotated.jpg": quadrant_jpeg(6),
        "one.png": enc(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
        "anim.gif": animated_gif(),
        "strip.png": enc(Image.new("L", (1, 5000), 128), "PNG"),
        "gray.png": enc(Image.new("L", (30, 20), 77), "PNG"),
    }
    for name, data in corpus.items():
        (src / name).write_bytes(data)
    os.symlink(src / "loop1.jpg", src / "loop2.jpg")
    os.symlink(src / "loop2.jpg", src / "loop1.jpg")
    with open(os.path.join(os.fsencode(src), b"bad\xffname.png"), "wb") as handle:
        handle.write(enc(noise(8, 12), "PNG"))
    out = tmp_path / "out"
    result = _embed(src, out, tiny_models, dask_scheduler)
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in read_manifest(out).to_pylist()}
    statuses = {path: row["status"] for path, row in rows.items()}
    assert statuses == {
        **{path: "ok" for path in good},
        "empty.jpg": "empty", "text.jpg": "not_an_image", "cut.jpg": "truncated", "bomb.png": "too_large",
        "cmyk.jpg": "ok", "sixteen.png": "ok", "palette.png": "ok", "rotated.jpg": "ok", "one.png": "ok",
        "anim.gif": "ok", "strip.png": "ok", "gray.png": "ok", "bad\\xffname.png": "ok",
        "loop1.jpg": "unreadable", "loop2.jpg": "unreadable",
    }
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (20, 40)  # EXIF applied
    assert rows["anim.gif"]["frames"] == 3 and rows["strip.png"]["clip_valid_w"] == 1
    assert all(row["error"] and "\n" not in row["error"] for row in rows.values() if row["status"] != "ok")
    assert "11 ok, 6 failed" in result.output
    for path, data in good.items():  # good images: untouched and embedded from their own bytes
        assert (src / path).read_bytes() == data and rows[path]["image_id"] == content_id(data)
    # A rerun records nothing new: failures are committed rows too.
    again = _embed(src, out, tiny_models, dask_scheduler)
    assert "0 computed" in again.output and "17 skipped" in again.output
    assert len(read_manifest(out)) == 17


def _computed(output: str) -> int:
    return int(output.split(" computed")[0].rsplit(";", 1)[1].strip())


def test_incremental_add_rename_edit(image_folder, tmp_path, tiny_models, dask_scheduler):
    out = tmp_path / "out"
    assert _computed(_embed(image_folder, out, tiny_models, dask_scheduler).output) == 8

    write_image_folder(image_folder, 2, seed=1, start=8)
    result = _embed(image_folder, out, tiny_models, dask_scheduler)
    assert _computed(result.output) == 2 and "8 skipped" in result.output

    (image_folder / "a" / "img0000.png").rename(image_folder / "renamed.png")
    result = _embed(image_folder, out, tiny_models, dask_scheduler)
    assert _computed(result.output) == 0 and "1 duplicates" in result.output
    rows = [r for r in read_manifest(out).to_pylist() if r["path"] == "renamed.png"]
    assert rows[0]["status"] == "duplicate" and "a/img0000.png" in rows[0]["error"]

    edited = image_folder / "b" / "img0001.jpg"
    Image.new("RGB", (30, 20), (9, 9, 9)).save(edited)
    os.utime(edited, (1_700_000_000, 1_700_000_000))
    result = _embed(image_folder, out, tiny_models, dask_scheduler)
    assert _computed(result.output) == 1
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    assert group["clip_tokens"].shape[0] == 11


def test_duplicate_content_is_computed_once(image_folder, tmp_path, tiny_models, dask_scheduler):
    shutil.copy(image_folder / "a" / "img0000.png", image_folder / "copy.png")
    out = tmp_path / "out"
    result = _embed(image_folder, out, tiny_models, dask_scheduler)
    assert _computed(result.output) == 8 and "1 duplicates" in result.output


def test_two_clean_runs_are_identical(image_folder, tmp_path, tiny_models, dask_scheduler):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _embed(image_folder, a, tiny_models, dask_scheduler).exit_code == 0
    assert _embed(image_folder, b, tiny_models, dask_scheduler).exit_code == 0
    # Same settings give bit-equal arrays (batches are formed the same way; other
    # shard sizes change batch composition and so the last float bits of SAM).
    assert_same_build(a, b)


def test_changed_settings_are_refused_and_overwrite_starts_over(image_folder, tmp_path, tiny_models, dask_scheduler):
    out = tmp_path / "out"
    assert _embed(image_folder, out, tiny_models, dask_scheduler).exit_code == 0
    result = run_cli(embed_args(image_folder, out, tiny_models, "--scheduler", dask_scheduler, "--precision", "bf16"))
    assert result.exit_code == 2
    assert "precision: stored \"fp32\", requested \"bf16\"" in result.output and "--overwrite" in result.output
    result = run_cli(embed_args(image_folder, out, tiny_models, "--scheduler", dask_scheduler, "--canvas", "96"))
    assert result.exit_code == 2 and "canvas: stored 64, requested 96" in result.output
    result = _embed(image_folder, out, tiny_models, dask_scheduler, "--no-sam")
    assert result.exit_code == 2 and "sam:" in result.output
    result = run_cli(embed_args(image_folder, out, tiny_models, "--scheduler", dask_scheduler, "--canvas", "96", "--overwrite"))
    assert result.exit_code == 0 and _computed(result.output) == 8
    assert zarr.open_group(str(out / "embeddings.zarr"), mode="r")["clip_tokens"].shape == (8, 64, 12, 12)


def test_second_run_exits_75_while_the_lock_is_held(image_folder, tmp_path, tiny_models, dask_scheduler):
    out = tmp_path / "out"
    with build_lock(out):
        result = _embed(image_folder, out, tiny_models, dask_scheduler)
    assert result.exit_code == 75
    assert "another batchseg run" in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--workers", "0"], "--workers must be between 1 and 1024"),
        (["--batch-size", "100000"], "--batch-size must be between 1 and 4096"),
        (["--threads", "5000"], "--threads must be between 1 and 1024"),
        (["--sam-checkpoint", "/nonexistent/sam.pth"], "/nonexistent/sam.pth"),
        (["--clip-model", "local-dir:/nonexistent/clip"], "/nonexistent/clip"),
        (["--clip-model", "No-Such-Model"], "No-Such-Model"),
        (["--no-clip", "--no-sam"], "nothing to compute"),
        (["--canvas", "60"], "60"),
    ],
)
def test_usage_errors_exit_2_without_traceback(image_folder, tmp_path, tiny_models, dask_scheduler, args, fragment):
    result = run_cli(embed_args(image_folder, tmp_path / "out", tiny_models, "--scheduler", dask_scheduler, *args))
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_missing_source_and_missing_sam_weights(tmp_path, tiny_models):
    result = run_cli(embed_args(tmp_path / "nope", tmp_path / "out", tiny_models))
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "src").mkdir()
    result = run_cli(["embed", str(tmp_path / "src"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "--sam-checkpoint" in result.output


def test_help_shows_examples_and_exit_codes():
    result = run_cli(["embed", "--help"])
    assert result.exit_code == 0
    assert "batchseg embed photos/ out/" in result.output and "75" in result.output


def test_same_checkpoint_by_a_relative_path_is_the_same_build(image_folder, tmp_path, tiny_models, dask_scheduler,
                                                              monkeypatch):
    out = tmp_path / "out"
    assert _embed(image_folder, out, tiny_models, dask_scheduler).exit_code == 0
    monkeypatch.chdir(tiny_models.sam_checkpoint.parent)
    args = embed_args(image_folder, out, tiny_models, "--scheduler", dask_scheduler)
    args[args.index("--sam-checkpoint") + 1] = tiny_models.sam_checkpoint.name  # relative spelling
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "0 computed" in result.output


def test_checkpoint_retrained_in_place_is_refused(image_folder, tmp_path, tiny_models, dask_scheduler):
    import shutil as _shutil

    from batchseg.models.sam import SAM_ARCHS, build_sam_model, save_sam_checkpoint

    ckpt = tmp_path / ("sam" + tiny_models.sam_checkpoint.suffix)
    _shutil.copy(tiny_models.sam_checkpoint, ckpt)
    out = tmp_path / "out"
    args = embed_args(image_folder, out, tiny_models, "--scheduler", dask_scheduler)
    args[args.index("--sam-checkpoint") + 1] = str(ckpt)
    assert run_cli(args).exit_code == 0
    torch.manual_seed(123)
    save_sam_checkpoint(build_sam_model(SAM_ARCHS["tiny"]), ckpt)
    result = run_cli(args)
    assert result.exit_code == 2 and "weights_sha256" in result.output


def test_output_folder_inside_the_source_is_not_embedded(tmp_path, tiny_models, dask_scheduler):
    src = tmp_path / "src"
    write_image_folder(src, 3, seed=4)
    out = src / "build"
    assert _embed(src, out, tiny_models, dask_scheduler).exit_code == 0
    (out / "report").mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(out / "report" / "thumb.png")
    result = _embed(src, out, tiny_models, dask_scheduler)
    assert result.exit_code == 0, result.output
    assert not any(r["path"].startswith("build/") for r in read_manifest(out).to_pylist())
    assert "0 computed" in result.output
