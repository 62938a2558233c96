"""Tests for batchseg.models.clip_timm: dense features of open_clip's timm (ConvNeXt)
towers against references computed location by location from timm's own trunk,
loading, unsupported variants, and the embed stage end to end.

Tiny random-init towers (timm's ``test_convnext``, 0.2 M parameters) built from
config dicts; nothing is downloaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import zarr
from helpers import run_cli
from open_clip.model import CLIP

from batchseg.errors import ModelLoadError, UsageError
from batchseg.io.images import decode_image
from batchseg.io.tables import read_manifest
from batchseg.models.clip import ClipSpec, DenseClip, load_dense_clip, preprocess_clip, save_local_dir, tiny_clip_config
from batchseg.models.clip_timm import check_timm, is_timm_tower, timm_features
from batchseg.testing import write_image_folder

# test_convnext: depths (1, 2, 4, 2), dims (24, 32, 48, 64), stride 32.
TIMM_PROJ = ("linear", "mlp")  # open_clip's convnext_base uses linear, convnext_large_d an MLP


def timm_config(proj: str = "linear", pool: str = "", model: str = "test_convnext", image_size: int = 64) -> dict:
    cfg = tiny_clip_config("vit")
    cfg["vision_cfg"] = {"timm_model_name": model, "timm_model_pretrained": False, "timm_pool": pool,
                         "timm_proj": proj, "image_size": image_size}
    return cfg


@pytest.fixture(scope="module")
def timm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("timm_models")
    return {proj: save_local_dir(timm_config(proj), root / proj, seed=3) for proj in TIMM_PROJ}


def _load(path: Path, canvas: int | None = None) -> DenseClip:
    """Load and jitter every parameter (zero biases and unit LayerNorm gains would hide mistakes)."""
    dc = load_dense_clip(ClipSpec("local-dir:" + str(path)), canvas=canvas)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dc.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return dc


def _pixels(dc: DenseClip, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, dc.canvas, dc.canvas, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("proj", TIMM_PROJ)
@pytest.mark.parametrize("canvas", [64, 128])
def test_dense_is_the_head_at_each_location(timm_dirs, proj, canvas):
    dc = _load(timm_dirs[proj], canvas=canvas)
    visual = dc.model.visual
    pixels = _pixels(dc)
    out = dc(pixels)

    f = visual.trunk.forward_features(pixels)  # timm's own trunk pass
    g = canvas // 32
    assert (dc.kind, dc.patch, dc.grid, dc.dense_dim, dc.key_dim) == ("timm", 32, g, 32, 64)
    assert out.dense.shape == (2, 32, g, g) and out.keys.shape == (2, 64, g, g) and out.global_.shape == (2, 32)
    torch.testing.assert_close(out.keys, f)
    norm = visual.trunk.head.norm  # ConvNeXt's head: pool, LayerNorm over channels, then open_clip's projection
    for y in range(g):
        for x in range(g):
            # Reference 1: the head's maths written out, on this location's feature vector.
            v = F.layer_norm(f[:, :, y, x], (64,), norm.weight, norm.bias, norm.eps)
            if proj == "linear":
                expected = v @ visual.head.proj.weight.T
            else:
                mlp = visual.head.mlp
                expected = F.linear(F.gelu(F.linear(v, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
            torch.testing.assert_close(out.dense[:, :, y, x], expected, rtol=1e-4, atol=1e-5)
            # Reference 2: the whole tower head on this location alone, as a 1x1 map.
            alone = visual.head(visual.trunk.forward_head(f[:, :, y : y + 1, x : x + 1]))
            torch.testing.assert_close(out.dense[:, :, y, x], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("proj", TIMM_PROJ)
def test_global_is_encode_image(timm_dirs, proj):
    dc = _load(timm_dirs[proj], canvas=96)
    pixels = _pixels(dc, batch=3)
    out = dc(pixels)
    assert torch.equal(out.global_, dc.model.encode_image(pixels))
    # ...and it is not the dense map's mean: the LayerNorm sits after the pool.
    assert not torch.allclose(out.dense.mean((2, 3)), out.global_, atol=1e-3)


def test_timm_features_direct_call_and_half_precision(timm_dirs):
    dc = _load(timm_dirs["linear"])
    pixels = _pixels(dc)
    dense, keys, global_ = timm_features(dc.model.visual, pixels)
    torch.testing.assert_close(dense, dc(pixels).dense)
    half = load_dense_clip(ClipSpec("local-dir:" + str(timm_dirs["linear"]))).half()
    out = half(pixels)  # float32 pixels are cast to the tower's dtype
    assert out.dense.dtype == torch.float16 and torch.isfinite(out.dense).all()


def test_local_dir_round_trip(timm_dirs, tmp_path):
    path = timm_dirs["linear"]
    assert json.loads((path / "open_clip_config.json").read_text())["model_cfg"] == timm_config("linear")
    ours = load_dense_clip(ClipSpec("local-dir:" + str(path)))
    theirs = open_clip.create_model("local-dir:" + str(path))
    assert is_timm_tower(ours.model.visual) and ours.kind == "timm" and ours.canvas == 64
    assert ours.model.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.model.state_dict()[k], v), k
    other = save_local_dir(timm_config("linear"), tmp_path / "other", seed=4)
    w = load_dense_clip(ClipSpec("local-dir:" + str(other))).model.visual.head.proj.weight
    assert not torch.equal(w, theirs.visual.head.proj.weight)
    rnd = load_dense_clip(ClipSpec("local-dir:" + str(path), pretrained="random"))
    assert not torch.equal(rnd.model.visual.head.proj.weight, theirs.visual.head.proj.weight)
    assert not ours.model.training and not any(p.requires_grad for p in ours.parameters())


def _written(cfg: dict):
    def make(tmp: Path) -> ClipSpec:
        path = tmp / "m"
        path.mkdir()
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        return ClipSpec("local-dir:" + str(path), pretrained="random")

    return make


ERROR_CASES = {  # case: (spec maker, load_dense_clip kwargs, expected message fragment)
    "attention pool (config)": (_written(timm_config(pool="abs_attn", proj="")), {}, "attention pooling"),
    "timm ViT": (_written(timm_config(model="vit_tiny_patch16_224", pool="avg", image_size=32)), {},
                 "does not pool a 2-D feature map"),
    "unknown timm model": (_written(timm_config(model="convnext_nonexistent")), {}, "unknown timm model"),
    "canvas not a multiple of 32": (_written(timm_config()), {"canvas": 48}, "multiple of the model's patch size 32"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_unsupported_timm_variants_are_refused_readably(tmp_path, case):
    make_spec, kwargs, message = ERROR_CASES[case]
    with pytest.raises(ModelLoadError, match=re.escape(message)) as info:
        load_dense_clip(make_spec(tmp_path), **kwargs)
    assert isinstance(info.value, UsageError)  # the CLI turns it into exit 2 without a traceback


def test_attention_pool_head_object_is_refused():
    """The same check on a built tower (a model built elsewhere and wrapped directly)."""
    model = CLIP(**timm_config(pool="abs_attn", proj="", image_size=64))
    with pytest.raises(ModelLoadError, match="attention-pooling head"):
        check_timm(model.visual)
    with pytest.raises(ModelLoadError, match="attention-pooling head"):
        DenseClip(model)


def test_clear_form_is_refused(timm_dirs):
    with pytest.raises(ModelLoadError, match="ViT towers only"):
        load_dense_clip(ClipSpec("local-dir:" + str(timm_dirs["linear"])), dense_form="clear")


def test_embed_stores_the_timm_dense_features(tmp_path, timm_dirs):
    images = tmp_path / "images"
    write_image_folder(images, 3, seed=2)
    out = tmp_path / "out"
    result = run_cli(["embed", str(images), str(out), "--clip-model", f"local-dir:{timm_dirs['linear']}",
                      "--canvas", "64", "--no-sam", "--precision", "fp32", "--batch-size", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    shapes = {name: group[name].shape for name in group.array_keys()}
    # the feature map (every head's input), and each row's owner
    assert shapes == {"clip_tokens": (3, 64, 2, 2), "clip_global": (3, 32), "image_id": (3, 32)}
    clip = load_dense_clip(ClipSpec(f"local-dir:{timm_dirs['linear']}"), canvas=64)
    rows = read_manifest(out).to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:
        image = decode_image((images / row["path"]).read_bytes())
        with torch.no_grad():
            expected = clip(preprocess_clip(image.pixels, 64, clip.mean, clip.std)[None])
        r = row["zarr_row"]
        for name, value in (("clip_tokens", expected.keys), ("clip_global", expected.global_)):
            np.testing.assert_allclose(group[name][r].astype(np.float32), value[0].numpy(), rtol=2e-3, atol=2e-3)
