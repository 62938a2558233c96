"""CLIP preprocessing follows the model's own preprocess_cfg (filter, mean, std, letterbox fill)."""
import json

import numpy as np
import open_clip
import pytest
import torch
import zarr
from PIL import Image

from batchseg.errors import ModelLoadError
from batchseg.io.images import decode_image
from batchseg.io.tables import read_manifest
from batchseg.models.clip import ClipSpec, load_dense_clip, save_local_dir, tiny_clip_config
from batchseg.models.clip_preprocess import preprocess_clip
from batchseg.testing import write_image_folder
from helpers import run_cli

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _model_dir(path, preprocess):
    config = tiny_clip_config("vit")
    config["vision_cfg"]["image_size"] = 64  # the canvas itself: no positional-embedding resize anywhere
    return save_local_dir(config, path, seed=3, preprocess=preprocess)


@pytest.mark.parametrize("stated, expected", [
    ({}, {"interpolation": "bicubic", "fill": "mean"}),
    ({"interpolation": "bilinear", "fill_color": 0}, {"interpolation": "bilinear", "fill": 0}),
    ({"fill_color": 255, "mean": MEAN, "std": STD}, {"interpolation": "bicubic", "fill": 255, "mean": MEAN, "std": STD}),
])
def test_the_models_config_decides(tmp_path, stated, expected):
    clip = load_dense_clip(ClipSpec(f"local-dir:{_model_dir(tmp_path / 'm', stated)}"))
    record = clip.preprocess.to_json()
    assert {key: record[key] for key in expected} == expected
    assert (clip.mean, clip.std) == (clip.preprocess.mean, clip.preprocess.std)


@pytest.mark.parametrize("stated, message", [
    ({"interpolation": "lanczos"}, "interpolation 'lanczos' is not supported"),
    ({"fill_color": [0, 0, 0]}, "one grey level"),
    ({"fill_color": 300}, "grey level 0..255"),
])
def test_unsupported_preprocessing_is_a_model_load_error(tmp_path, stated, message):
    with pytest.raises(ModelLoadError, match=message):
        load_dense_clip(ClipSpec(f"local-dir:{_model_dir(tmp_path / 'm', stated)}"))


def test_fill_is_applied_in_pixel_space():
    image = np.full((10, 20, 3), 200, dtype=np.uint8)
    mean, std = np.array(MEAN), np.array(STD)
    black = preprocess_clip(image, 32, MEAN, STD, fill=0)
    assert np.allclose(black[:, 20:, :].numpy(), ((0 - mean) / std)[:, None, None])  # black, normalised
    assert np.allclose(black[:, :16, :].numpy(), ((200 / 255 - mean) / std)[:, None, None], atol=1e-6)
    grey = preprocess_clip(image, 32, MEAN, STD)
    assert np.allclose(grey[:, 20:, :].numpy(), 0.0)  # no fill stated: the mean colour


def _open_clip_input(pixels: np.ndarray, canvas: int, resample, fill: int | None) -> torch.Tensor:
    """The letterbox built independently with PIL: resize, paste top-left on the fill, normalise."""
    h, w = pixels.shape[:2]
    scale = canvas / max(h, w)
    size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    resized = Image.fromarray(pixels).resize(size, resample)
    board = Image.new("RGB", (canvas, canvas), (fill or 0,) * 3)
    board.paste(resized, (0, 0))
    x = torch.from_numpy(np.asarray(board, dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    if fill is None:
        x[:, size[1]:, :] = 0
        x[:, :, size[0]:] = 0
    return x[None]


def test_stored_features_equal_open_clip_on_the_same_letterbox(tmp_path, dask_scheduler):
    model_dir = _model_dir(tmp_path / "m", {"interpolation": "bilinear", "fill_color": 0, "mean": MEAN, "std": STD})
    src, out = tmp_path / "src", tmp_path / "out"
    write_image_folder(src, 3, seed=4)
    args = ["embed", str(src), str(out), "--clip-model", f"local-dir:{model_dir}", "--no-sam", "--precision", "fp32",
            "--batch-size", "1", "--scheduler", dask_scheduler, "-q"]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "batchseg.json").read_text())["embed"]["preprocessing"]
    assert record == {"interpolation": "bilinear", "mean": MEAN, "std": STD, "fill": 0}

    model = open_clip.create_model(f"local-dir:{model_dir}").eval()
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    padded = 0
    for row in read_manifest(out).to_pylist():
        pixels = decode_image((src / row["path"]).read_bytes()).pixels
        padded += pixels.shape[0] != pixels.shape[1]
        stored = torch.from_numpy(group["clip_global"][row["zarr_row"]].astype(np.float32))
        with torch.no_grad():
            expected = model.encode_image(_open_clip_input(pixels, 64, Image.Resampling.BILINEAR, 0))[0]
            other = model.encode_image(_open_clip_input(pixels, 64, Image.Resampling.BICUBIC, None))[0]
        torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)
        assert not torch.allclose(stored, other, rtol=2e-3, atol=2e-3)  # the old way would be caught
    assert padded  # some image was letterboxed, so the fill mattered


def test_a_change_of_preprocessing_is_a_settings_change(tmp_path, dask_scheduler):
    model_dir = _model_dir(tmp_path / "m", {"interpolation": "bilinear"})
    src, out = tmp_path / "src", tmp_path / "out"
    write_image_folder(src, 2, seed=5)
    args = ["embed", str(src), str(out), "--clip-model", f"local-dir:{model_dir}", "--no-sam", "--precision", "fp32",
            "--scheduler", dask_scheduler, "-q"]
    assert run_cli(args).exit_code == 0
    build = json.loads((out / "batchseg.json").read_text())
    del build["embed"]["preprocessing"]  # a build made before preprocessing was recorded: bicubic, mean fill
    (out / "batchseg.json").write_text(json.dumps(build))
    Image.new("RGB", (30, 20), (9, 99, 199)).save(src / "new.png")
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    assert 'interpolation: stored "bicubic", requested "bilinear"' in result.output
