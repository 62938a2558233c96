"""embed --fine-canvas stores CLIP's tokens at a second, larger canvas; pseudolabel's round 0
averages both canvases' MaskCLIP logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from batchseg.config import LabelSettings
from batchseg.io.build_info import read_json
from batchseg.io.geometry import letterbox
from batchseg.io.images import decode_image
from batchseg.io.store import CheckedRowReader, ModelGeometry
from batchseg.io.store_integrity import chunk_file, verify_rows
from batchseg.io.tables import read_labels, read_manifest
from batchseg.labels.image_labels import ImageFrame, grid_probs_to_work
from batchseg.labels.maskclip import maskclip_probs
from batchseg.models.clip import ClipSpec, load_dense_clip, preprocess_clip
from batchseg.models.text import MASKCLIP_TEMPLATES
from batchseg.models.vocabulary import load_classifier, parse_classes, with_background
from batchseg.stages.pseudolabel import _images
from batchseg.stages.pseudolabel_shard import RoundContext, round0_probs
from helpers import embed_args, run_cli

CLASSES = "red thing,green thing,blue thing"
FINE = 128  # the tiny CLIP's patch is 8; embed_args' canvas is 64
LABEL = ["--classes", CLASSES, "--background", "--rounds", "0", "--points-per-side", "4", "--pred-iou-thresh", "0",
         "--stability-thresh", "0", "-q"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory, _image_folder_template, tiny_models, dask_scheduler) -> dict[str, Path]:
    """The 8 template images embedded with and without a fine canvas (copy before writing)."""
    root = tmp_path_factory.mktemp("fine")
    made = {}
    for name, extra in (("fine", ["--fine-canvas", str(FINE)]), ("coarse", [])):
        result = run_cli(embed_args(_image_folder_template, root / name, tiny_models, "--scheduler", dask_scheduler,
                                    *extra))
        assert result.exit_code == 0, result.output
        made[name] = root / name
    return made


def _copy(builds: dict[str, Path], name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(builds[name], target)
    return target


def _image_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("shard", "run_id")} for row in read_manifest(out).to_pylist()]


def test_fine_tokens_are_the_model_run_at_the_fine_canvas(builds, _image_folder_template, tiny_models):
    out = builds["fine"]
    group, coarse = (zarr.open_group(str(b / "embeddings.zarr"), mode="r") for b in (out, builds["coarse"]))
    assert {name: group[name].shape for name in ("clip_tokens_fine", "clip_cls_fine")} == {
        "clip_tokens_fine": (8, 64, 16, 16), "clip_cls_fine": (8, 64)}
    geometry = ModelGeometry.from_json(read_json(out / "batchseg.json")["embed"]["geometry"])
    assert (geometry.clip_canvas, geometry.clip_fine_canvas, geometry.clip_fine_grid) == (64, FINE, 16)
    assert _image_rows(out) == _image_rows(builds["coarse"])  # the manifest knows nothing of the fine canvas
    # A build without one records its embedding as builds before the option did (their label keys hash it).
    assert "fine" not in json.dumps(read_json(builds["coarse"] / "batchseg.json")["embed"])
    assert read_json(out / "batchseg.json")["embed"]["models"]["clip_fine_canvas"] == FINE
    clip = load_dense_clip(ClipSpec(tiny_models.clip_option), canvas=FINE).eval()
    for row in read_manifest(out).to_pylist():
        image = decode_image((_image_folder_template / row["path"]).read_bytes())
        with torch.no_grad():
            expected = clip.encode_tokens(preprocess_clip(image.pixels, FINE, clip.mean, clip.std)[None])
        r = row["zarr_row"]
        np.testing.assert_allclose(group["clip_tokens_fine"][r].astype(np.float32), expected.tokens[0].numpy(),
                                   rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(group["clip_cls_fine"][r].astype(np.float32), expected.cls[0].numpy(),
                                   rtol=2e-3, atol=2e-3)
        # The first canvas is what a build without the fine canvas stores.
        np.testing.assert_array_equal(group["clip_tokens"][r], coarse["clip_tokens"][r])


def test_a_rerun_keeps_the_fine_canvas_and_refuses_another(builds, _image_folder_template, tiny_models, dask_scheduler,
                                                           tmp_path):
    out = _copy(builds, "fine", tmp_path)
    again = run_cli(embed_args(_image_folder_template, out, tiny_models, "--scheduler", dask_scheduler,
                               "--fine-canvas", str(FINE)))
    assert again.exit_code == 0 and "0 computed" in again.output, again.output
    for extra, words in (([], "fine canvas: stored 128, requested none"),
                         (["--fine-canvas", "192"], "fine canvas: stored 128, requested 192")):
        result = run_cli(embed_args(_image_folder_template, out, tiny_models, "--scheduler", dask_scheduler, *extra))
        assert result.exit_code == 2 and words in result.output and "--overwrite" in result.output, result.output
    coarse = _copy(builds, "coarse", tmp_path)
    result = run_cli(embed_args(_image_folder_template, coarse, tiny_models, "--scheduler", dask_scheduler,
                                "--fine-canvas", str(FINE)))
    assert result.exit_code == 2 and "fine canvas: stored none, requested 128" in result.output


@pytest.mark.parametrize("extra, words", [
    (["--fine-canvas", "64"], "--fine-canvas must be larger than --canvas (64), got 64"),
    (["--fine-canvas", "100"], "--fine-canvas must be a multiple of the CLIP patch size (8)"),
    (["--no-clip", "--fine-canvas", "128"], "--fine-canvas needs CLIP"),
])
def test_bad_fine_canvas_exits_2_without_traceback(_image_folder_template, tiny_models, dask_scheduler, tmp_path,
                                                   extra, words):
    result = run_cli(embed_args(_image_folder_template, tmp_path / "out", tiny_models, "--scheduler", dask_scheduler,
                                *extra))
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output


def _reference_probs(clip, image, canvas: int, classifier: torch.Tensor, frame: ImageFrame) -> torch.Tensor:
    """MaskCLIP's probabilities from the whole model run on the image at ``canvas``, on the work frame."""
    with torch.no_grad():
        out = clip(preprocess_clip(image.pixels, canvas, clip.mean, clip.std)[None])
    grid = maskclip_probs(out.dense[0], out.keys[0], classifier, key_smoothing=False, prompt_denoising=True)
    box = letterbox(image.height, image.width, canvas)
    return grid_probs_to_work(grid, canvas, box.valid_h, box.valid_w, frame)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_round0_probs_fuse_the_whole_models_at_both_canvases(builds, _image_folder_template, tiny_models,
                                                            dask_scheduler, tmp_path, weight):
    out = _copy(builds, "fine", tmp_path)
    result = run_cli(["pseudolabel", str(out), "--scheduler", dask_scheduler, *LABEL])  # stores the text classifier
    assert result.exit_code == 0, result.output
    build = read_json(out / "batchseg.json")
    vocab = with_background(parse_classes(CLASSES))
    classifier_path = next((out / "text").glob("*.safetensors"))
    settings = LabelSettings(vocabulary=parse_classes(CLASSES), templates=MASKCLIP_TEMPLATES,
                             background=True, fine_weight=weight)
    ctx = RoundContext(out, 0, vocab.names, classifier_path, settings,
                       ModelGeometry.from_json(build["embed"]["geometry"]), True, None,
                       ClipSpec(tiny_models.clip_option))
    classifier = load_classifier(classifier_path)
    models = {canvas: load_dense_clip(ClipSpec(tiny_models.clip_option), canvas=canvas).eval() for canvas in (64, FINE)}
    store, moved = CheckedRowReader(out), 0.0
    paths = {row["image_id"]: row["path"] for row in read_manifest(out).to_pylist()}
    for image in _images(out):
        frame = ImageFrame.create(image.image_id, image.height, image.width, settings.work_max_side)
        decoded = decode_image((_image_folder_template / paths[image.image_id]).read_bytes())
        coarse, fine = (_reference_probs(models[c], decoded, c, classifier, frame) for c in (64, FINE))
        expected = torch.softmax((1 - weight) * coarse.clamp_min(1e-12).log() + weight * fine.clamp_min(1e-12).log(), 0)
        with torch.no_grad():
            got = round0_probs(ctx, store, image, frame)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)  # stored tokens are fp16
        moved = max(moved, float((got - coarse).abs().max()))
    assert (moved < 2e-2) if weight == 0 else (moved > 0.1)  # the fine canvas is used, or with weight 0 ignored


def _maskclip_rows(out: Path) -> list[tuple]:
    rows = read_labels(out, 0).to_pylist()
    return sorted((r["image_id"], r["source"], r["kind"], r["class_id"], r["mask"]["counts"]) for r in rows)


def test_fine_weight_0_labels_like_a_build_without_the_fine_canvas(builds, dask_scheduler, tmp_path):
    fine, coarse = _copy(builds, "fine", tmp_path), _copy(builds, "coarse", tmp_path)
    for out, extra in ((fine, ["--fine-weight", "0"]), (coarse, [])):
        result = run_cli(["pseudolabel", str(out), "--scheduler", dask_scheduler, *LABEL, *extra])
        assert result.exit_code == 0, result.output
    assert _maskclip_rows(fine) == _maskclip_rows(coarse)
    result = run_cli(["pseudolabel", str(fine), "--scheduler", dask_scheduler, *LABEL])  # the default weight: relabelled
    assert result.exit_code == 0, result.output
    assert _maskclip_rows(fine) != _maskclip_rows(coarse)
    bad = run_cli(["pseudolabel", str(fine), "--scheduler", dask_scheduler, *LABEL, "--fine-weight", "2"])
    assert bad.exit_code == 2 and "--fine-weight must be in [0, 1], got 2.0" in bad.output


def test_a_damaged_fine_row_is_not_labelled_and_verify_recomputes_it(builds, _image_folder_template, tiny_models,
                                                                     dask_scheduler, tmp_path):
    out = _copy(builds, "fine", tmp_path)
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    chunk_file(out, group["clip_tokens_fine"], 4).unlink()
    victim = next(r["image_id"] for r in read_manifest(out).to_pylist() if r["zarr_row"] == 4)
    labelled = run_cli(["pseudolabel", str(out), "--scheduler", dask_scheduler, *LABEL])
    assert labelled.exit_code == 1 and "1 images NOT labelled" in labelled.output, labelled.output
    assert victim not in set(read_labels(out, 0).column("image_id").to_pylist())
    verified = run_cli(embed_args(_image_folder_template, out, tiny_models, "--scheduler", dask_scheduler,
                                  "--fine-canvas", str(FINE), "--verify"))
    assert verified.exit_code == 0 and "1 damaged, 1 recomputed, 0 left damaged" in verified.output, verified.output
    assert verify_rows(out, range(8)) == {}
    reference = zarr.open_group(str(builds["fine"] / "embeddings.zarr"), mode="r")["clip_tokens_fine"][4]
    np.testing.assert_allclose(zarr.open_group(str(out / "embeddings.zarr"), mode="r")["clip_tokens_fine"][4]
                               .astype(np.float32), reference.astype(np.float32), rtol=2e-3, atol=2e-3)
