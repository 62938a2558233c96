"""Tests for batchseg.models.clip: MaskCLIP dense features against independent
references built from open_clip's own modules, loading errors, preprocessing.

Everything runs on tiny random-init models saved as local-dir folders; nothing is
downloaded.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from batchseg.errors import ModelLoadError, UsageError
from batchseg.io.geometry import letterbox
from batchseg.models.clip import (
    ClipSpec,
    DenseClip,
    DenseClipOutput,
    interpolate_pos_embed,
    load_dense_clip,
    preprocess_clip,
    save_local_dir,
    tiny_clip_config,
)

# ViT variants the dense path supports; each must match the references exactly.
VIT_VARIANTS = {
    "plain": {},
    "layer_scale": {"ls_init_value": 0.5},
    "avg_pool_final_ln": {"pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
    "custom_block": {"block_type": "custom"},
    "patch16_image64": {"patch_size": 16, "image_size": 64},
}


def _vit_config(variant: str) -> dict:
    cfg = tiny_clip_config("vit")
    cfg["vision_cfg"].update(VIT_VARIANTS[variant])
    return cfg


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_models")
    dirs = {f"vit-{v}": save_local_dir(_vit_config(v), root / f"vit-{v}", seed=1) for v in VIT_VARIANTS}
    dirs["resnet"] = save_local_dir(tiny_clip_config("resnet"), root / "resnet", seed=2)
    return dirs


def _load(path: Path, canvas: int | None = None, dense_form: str = "official") -> DenseClip:
    """Load and jitter every parameter, so zero-initialised biases, layer scales and
    BatchNorm gammas do not hide mistakes in the value path."""
    dc = load_dense_clip(ClipSpec("local-dir:" + str(path)), canvas=canvas, dense_form=dense_form)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dc.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return dc


def _pixels(dc: DenseClip, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, dc.canvas, dc.canvas, generator=torch.Generator().manual_seed(seed))


def _to_map(tokens: torch.Tensor, g: int) -> torch.Tensor:
    return tokens.reshape(tokens.shape[0], g, g, -1).permute(0, 3, 1, 2)


def _last_block_input(visual, pixels: torch.Tensor) -> torch.Tensor:
    """Tokens entering the last ViT block, via open_clip's own embedding and blocks."""
    x = visual._embeds(pixels)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x


# --- ViT -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
@pytest.mark.parametrize("scale", [1, 2])
def test_vit_official_equals_diagonal_attention_block(model_dirs, variant, scale):
    """MaskCLIP's value path == open_clip's own last block with attention restricted to
    the diagonal (each token attends only to itself, so attention output = out_proj(v))."""
    native = _vit_config(variant)["vision_cfg"]["image_size"]
    dc = _load(model_dirs[f"vit-{variant}"], canvas=native * scale)
    visual = dc.model.visual
    pixels = _pixels(dc)
    out = dc(pixels)

    x = _last_block_input(visual, pixels)
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf"))
    mask.fill_diagonal_(0.0)
    y = visual.transformer.resblocks[-1](x, attn_mask=mask)
    ref = _to_map(visual.ln_post(y[:, 1:]) @ visual.proj, dc.grid)

    assert isinstance(out, DenseClipOutput)
    assert out.dense.shape == (2, dc.dense_dim, dc.grid, dc.grid)
    torch.testing.assert_close(out.dense, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
def test_vit_clear_and_keys_from_in_proj_weights(model_dirs, variant):
    """clear = ln_post(out_proj(v)) @ proj and keys = out_proj(k), from the raw
    in_proj_weight slices (q | k | v rows)."""
    dc = _load(model_dirs[f"vit-{variant}"], dense_form="clear")
    visual = dc.model.visual
    pixels = _pixels(dc)
    out = dc(pixels)

    last = visual.transformer.resblocks[-1]
    attn = last.attn
    x = _last_block_input(visual, pixels)
    h = last.ln_1(x)
    w, b, c = attn.in_proj_weight, attn.in_proj_bias, x.shape[-1]
    k = F.linear(h, w[c : 2 * c], b[c : 2 * c])
    v = F.linear(h, w[2 * c :], b[2 * c :])
    clear = visual.ln_post(attn.out_proj(v)[:, 1:]) @ visual.proj
    keys = attn.out_proj(k)[:, 1:]

    torch.testing.assert_close(out.dense, _to_map(clear, dc.grid), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.keys, _to_map(keys, dc.grid), rtol=1e-4, atol=1e-5)
    assert out.keys.shape == (2, dc.key_dim, dc.grid, dc.grid) and dc.key_dim == visual.transformer.width


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
@pytest.mark.parametrize("dense_form", ["official", "clear"])
@pytest.mark.parametrize("scale", [1, 2])
def test_vit_global_equals_encode_image(model_dirs, variant, dense_form, scale):
    native = _vit_config(variant)["vision_cfg"]["image_size"]
    dc = _load(model_dirs[f"vit-{variant}"], canvas=native * scale, dense_form=dense_form)
    pixels = _pixels(dc, batch=3)
    out = dc(pixels)
    assert out.global_.shape == (3, dc.dense_dim)
    torch.testing.assert_close(out.global_, dc.model.encode_image(pixels), rtol=1e-5, atol=1e-6)


def test_official_and_clear_differ(model_dirs):
    official = _load(model_dirs["vit-plain"])
    clear = _load(model_dirs["vit-plain"], dense_form="clear")
    pixels = _pixels(official)
    a, b = official(pixels), clear(pixels)
    torch.testing.assert_close(a.keys, b.keys)
    torch.testing.assert_close(a.global_, b.global_)
    assert not torch.allclose(a.dense, b.dense)


def test_vit_sequence_first_blocks(model_dirs):
    """Blocks built with batch_first=False take (L, B, W); the wrapper must transpose."""
    dc = _load(model_dirs["vit-plain"])
    pixels = _pixels(dc)
    before = dc(pixels)
    transformer = dc.model.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    after = dc(pixels)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.global_, dc.model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_fp32(model_dirs):
    dc = _load(model_dirs["vit-plain"])
    pixels = _pixels(dc)
    ref = dc(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dc(pixels)
    for a, b in zip(ref, low):
        torch.testing.assert_close(b.float(), a, rtol=0.1, atol=0.1)


# --- ResNet ----------------------------------------------------------------------------


def _layer4(visual, pixels: torch.Tensor) -> torch.Tensor:
    f = visual.stem(pixels)
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        f = layer(f)
    return f


@pytest.mark.parametrize("scale", [1, 2])
def test_resnet_dense_keys_global(model_dirs, scale):
    dc = _load(model_dirs["resnet"], canvas=64 * scale)
    visual = dc.model.visual
    pool = visual.attnpool
    pixels = _pixels(dc)
    out = dc(pixels)

    f = _layer4(visual, pixels)
    tokens = f.flatten(2).transpose(1, 2)
    assert dc.grid == 2 * scale == f.shape[-1] and dc.patch == 32
    torch.testing.assert_close(out.dense, _to_map(pool.c_proj(pool.v_proj(tokens)), dc.grid), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.keys, _to_map(pool.k_proj(tokens), dc.grid), rtol=1e-4, atol=1e-5)
    assert out.keys.shape[1] == dc.key_dim == f.shape[1]
    torch.testing.assert_close(out.global_, dc.model.encode_image(pixels), rtol=1e-5, atol=1e-6)


def test_resnet_dense_is_diagonal_attention_pool_without_positions(model_dirs):
    """Run open_clip's attention pool maths with a diagonal mask: each spatial token's
    output is c_proj(v_proj(f + pos)). The MaskCLIP head leaves the positional term
    out, so the difference must be exactly c_proj.W @ v_proj.W @ pos."""
    dc = _load(model_dirs["resnet"])
    pool = dc.model.visual.attnpool
    pixels = _pixels(dc)
    out = dc(pixels)

    f = _layer4(dc.model.visual, pixels)
    x = f.flatten(2).permute(2, 0, 1)  # (HW, B, C) as AttentionPool2d does
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :]
    n = x.shape[0]
    mask = torch.full((n, n), float("-inf"))
    mask.fill_diagonal_(0.0)
    y, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False, attn_mask=mask,
    )
    with_pos = _to_map(y[1:].transpose(0, 1), dc.grid)
    pos_term = pool.positional_embedding[1:] @ pool.v_proj.weight.T @ pool.c_proj.weight.T  # (HW, D)
    torch.testing.assert_close(with_pos - out.dense, _to_map(pos_term[None].expand(2, -1, -1), dc.grid),
                               rtol=1e-4, atol=1e-4)


# --- positional embeddings -------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit-plain", "resnet"])
def test_native_canvas_changes_nothing(model_dirs, name):
    """canvas None and canvas = training size give the untouched positional embedding
    (bit-equal to a plain open_clip load) and identical features."""
    spec = ClipSpec("local-dir:" + str(model_dirs[name]))
    fresh = open_clip.create_model(spec.model)
    default = load_dense_clip(spec)
    explicit = load_dense_clip(spec, canvas=default.canvas)
    owner = (lambda m: m.visual.attnpool) if name == "resnet" else (lambda m: m.visual)
    for dc in (default, explicit):
        assert torch.equal(owner(dc.model).positional_embedding, owner(fresh).positional_embedding)
    pixels = _pixels(default)
    for a, b in zip(default(pixels), explicit(pixels)):
        assert torch.equal(a, b)
    torch.testing.assert_close(default(pixels).global_, fresh.eval().encode_image(pixels))


@pytest.mark.parametrize(
    "name, native_canvas, canvas, grid",
    [
        ("vit-plain", 32, 64, 8),
        ("vit-plain", 32, 16, 2),
        ("vit-plain", 32, 40, 5),
        ("vit-patch16_image64", 64, 128, 8),
        ("resnet", 64, 128, 4),
        ("resnet", 64, 96, 3),
    ],
)
def test_canvas_resize_interpolates_once(model_dirs, name, native_canvas, canvas, grid):
    spec = ClipSpec("local-dir:" + str(model_dirs[name]))
    dc = load_dense_clip(spec, canvas=canvas)
    fresh = open_clip.create_model(spec.model)
    owner = (lambda m: m.visual.attnpool) if name == "resnet" else (lambda m: m.visual)
    old, new = owner(fresh).positional_embedding, owner(dc.model).positional_embedding
    assert (dc.canvas, dc.grid) == (canvas, grid)
    assert new.shape == (1 + grid * grid, old.shape[1])
    assert torch.equal(new[0], old[0])  # class token kept
    side = native_canvas // dc.patch
    expected = F.interpolate(
        old[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic",
        align_corners=False, antialias=True,
    ).permute(0, 2, 3, 1).reshape(grid * grid, -1)
    torch.testing.assert_close(new[1:], expected)
    out = dc(_pixels(dc))
    assert out.dense.shape[-2:] == out.keys.shape[-2:] == (grid, grid)


def test_interpolate_pos_embed_properties():
    pos = torch.randn(1 + 16, 8)
    assert interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
    const = torch.ones(1 + 16, 8) * torch.arange(8.0)  # a per-channel constant grid stays constant
    up = interpolate_pos_embed(const, (4, 4), (7, 7))
    torch.testing.assert_close(up, torch.ones(1 + 49, 8) * torch.arange(8.0))


# --- loading ---------------------------------------------------------------------------


def test_local_dir_round_trip(model_dirs, tmp_path):
    path = model_dirs["vit-plain"]
    cfg = json.loads((path / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == _vit_config("plain") and "mean" in cfg["preprocess_cfg"]
    ours = load_dense_clip(ClipSpec("local-dir:" + str(path)))
    theirs = open_clip.create_model("local-dir:" + str(path))
    assert ours.model.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.model.state_dict()[k], v), k
    # Same seed, same weights; the caller's RNG is left alone.
    state = torch.get_rng_state()
    again = save_local_dir(_vit_config("plain"), tmp_path / "again", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    other = save_local_dir(_vit_config("plain"), tmp_path / "other", seed=5)
    a = load_dense_clip(ClipSpec("local-dir:" + str(again))).model.visual.proj
    b = load_dense_clip(ClipSpec("local-dir:" + str(other))).model.visual.proj
    assert torch.equal(a, theirs.visual.proj) and not torch.equal(a, b)
    # "random" ignores the folder's weights.
    rnd = load_dense_clip(ClipSpec("local-dir:" + str(path), pretrained="random"))
    assert not torch.equal(rnd.model.visual.proj, theirs.visual.proj)


def test_geometry_and_normalisation_come_from_the_model(model_dirs, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(model_dirs["vit-plain"], path)
    cfg = json.loads((path / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"]["mean"], cfg["preprocess_cfg"]["std"] = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    dc = load_dense_clip(ClipSpec("local-dir:" + str(path)))
    assert (dc.mean, dc.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert (dc.canvas, dc.patch, dc.grid, dc.dense_dim, dc.key_dim, dc.kind) == (32, 8, 4, 32, 64, "vit")
    assert not dc.model.training and not any(p.requires_grad for p in dc.parameters())
    dc.train()
    assert not dc.training and not dc.model.visual.training


def _write_dir(path: Path, model_cfg: dict | None, weights: bytes | None, name: str) -> str:
    path.mkdir(parents=True, exist_ok=True)
    if model_cfg is not None:
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    if weights is not None:
        (path / name).write_bytes(weights)
    return "local-dir:" + str(path)


def _cfg_with(**vision) -> dict:
    cfg = tiny_clip_config("vit")
    cfg["vision_cfg"].update(vision)
    return cfg


def _bad_json_dir(tmp, dirs):
    _write_dir(tmp / "d", None, None, "")
    (tmp / "d" / "open_clip_config.json").write_text("{oops")
    return ClipSpec("local-dir:" + str(tmp / "d"))


def _garbage_file_for_named_model(tmp, dirs):
    (tmp / "garbage.pt").write_bytes(b"\x80\x02not a pickle")
    return ClipSpec("RN50", pretrained=str(tmp / "garbage.pt"))


def _wrong_arch(tmp, dirs):
    """ResNet weights next to a ViT config: a checkpoint that does not fit."""
    spec = _write_dir(tmp / "wrong", tiny_clip_config("vit"), None, "")
    shutil.copy(dirs["resnet"] / "open_clip_model.safetensors", tmp / "wrong")
    return ClipSpec(spec)


def _saved(name: str, **spec_kw):
    """A spec for one of the fixture's good folders."""
    return lambda tmp, dirs: ClipSpec("local-dir:" + str(dirs[name]), **spec_kw)


def _written(model_cfg: dict | None, weights: bytes | None = b"garbage", name: str = "open_clip_model.safetensors"):
    """A spec for a fresh folder holding ``model_cfg`` and a ``weights`` file."""
    return lambda tmp, dirs: ClipSpec(_write_dir(tmp / "d", model_cfg, weights, name))


_TIMM_CFG = {**tiny_clip_config("vit"), "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "image_size": 224}}

ERROR_CASES = {  # case: (spec maker, load_dense_clip kwargs, expected message fragment)
    "unknown model name": (lambda tmp, dirs: ClipSpec("ViT-B-166"), {}, "unknown CLIP model 'ViT-B-166'"),
    "missing local-dir": (lambda tmp, dirs: ClipSpec("local-dir:" + str(tmp / "nope")), {}, "folder not found"),
    "local-dir without config": (_written(None), {}, "no open_clip_config.json"),
    "local-dir config not json": (_bad_json_dir, {}, "not a valid open_clip config"),
    "local-dir without weights": (_written(tiny_clip_config("vit"), weights=None), {}, "no weights file"),
    "garbage safetensors": (_written(tiny_clip_config("vit")), {}, "could not load CLIP model"),
    "garbage torch pickle": (
        _written(tiny_clip_config("vit"), name="open_clip_pytorch_model.bin"), {}, "could not load CLIP model"
    ),
    "garbage checkpoint file for a named model": (_garbage_file_for_named_model, {}, "from checkpoint"),
    "checkpoint of another architecture": (_wrong_arch, {}, "could not load CLIP model"),
    "checkpoint file not found": (
        lambda tmp, dirs: ClipSpec("RN50", pretrained=str(tmp / "x.pt")), {}, "checkpoint file not found"
    ),
    "unknown pretrained tag": (
        lambda tmp, dirs: ClipSpec("RN50", pretrained="nonsense"), {}, "unknown pretrained tag 'nonsense'"
    ),
    "pretrained with local-dir": (_saved("vit-plain", pretrained="openai"), {}, "loads the weights in its folder"),
    "canvas not a multiple of the patch": (_saved("vit-plain"), {"canvas": 30}, "multiple of the model's patch size 8"),
    "resnet canvas not a multiple of 32": (_saved("resnet"), {"canvas": 48}, "multiple of the model's patch size 32"),
    "canvas zero": (_saved("vit-plain"), {"canvas": 0}, "positive multiple"),
    "clear form on resnet": (_saved("resnet"), {"dense_form": "clear"}, "ViT towers only"),
    "unknown dense form": (_saved("vit-plain"), {"dense_form": "sharp"}, "unknown dense form"),
    "timm ViT tower": (_written(_TIMM_CFG), {}, "does not pool a 2-D feature map"),
    "attentional pooler": (_written(_cfg_with(attentional_pool=True)), {}, "attentional pooler"),
    "qk norm attention": (_written(_cfg_with(qk_norm=True)), {}, "qk_norm"),
    "no pooling": (_written(_cfg_with(pool_type="none")), {}, "pool_type 'none'"),
    "invalid device": (_saved("vit-plain"), {"device": "toaster"}, "invalid device"),
    "pretrained with hf-hub": (
        lambda tmp, dirs: ClipSpec("hf-hub:someone/some-clip", pretrained="openai"), {}, "loads its own weights"
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_load_errors_are_readable(model_dirs, tmp_path, case):
    make_spec, kwargs, message = ERROR_CASES[case]
    with pytest.raises(ModelLoadError, match=re.escape(message)) as info:
        load_dense_clip(make_spec(tmp_path, model_dirs), **kwargs)
    assert isinstance(info.value, UsageError)  # the CLI maps it to exit code 2, no traceback


def test_failed_download_is_a_model_load_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(ModelLoadError, match="could not download or load pretrained weights 'openai'.*no internet"):
        load_dense_clip(ClipSpec("RN50", pretrained="openai"))


@pytest.mark.parametrize(
    "model, tag, quick_gelu",
    [("ViT-B-16", "openai", True), ("ViT-B/16", "openai", True), ("ViT-B-16", "laion2b_s34b_b88k", False)],
)
def test_quick_gelu_follows_the_pretrained_tag(monkeypatch, model, tag, quick_gelu):
    """OpenAI weights were trained with QuickGELU; open_clip only warns when the named
    config says GELU, so the loader must force it (checked without downloading)."""
    seen = {}

    def fake_create_model(name, **kwargs):
        seen.update(kwargs, name=name)
        raise RuntimeError("stop before any download")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(ModelLoadError):
        load_dense_clip(ClipSpec(model, pretrained=tag))
    assert seen["name"] == "ViT-B-16" and seen["pretrained"] == tag
    assert seen["force_quick_gelu"] is quick_gelu and seen["weights_only"] is True


def test_unsupported_tower_object_is_rejected():
    with pytest.raises(ModelLoadError, match="unsupported CLIP image tower"):
        DenseClip(torch.nn.Module())


# --- preprocessing ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (64, 64), (7, 3), (200, 100), (1, 90)])
def test_preprocess_clip_letterbox(shape):
    h, w = shape
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    out = preprocess_clip(image, 64, mean, std)
    box = letterbox(h, w, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.all(out[:, box.valid_h :, :] == 0) and torch.all(out[:, :, box.valid_w :] == 0)
    valid = out[:, : box.valid_h, : box.valid_w]
    if box.valid_h * box.valid_w > 1:
        assert valid.std() > 0.1  # real content, not a constant


def test_preprocess_clip_normalises_exactly():
    image = np.zeros((40, 20, 3), dtype=np.uint8)
    image[...] = (255, 128, 0)
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)
    out = preprocess_clip(image, 32, mean, std)  # 40x20 -> 32x16: a constant image stays constant
    expected = (torch.tensor([255, 128, 0]) / 255.0 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out[:, :32, :16], expected.view(3, 1, 1).expand(3, 32, 16))
    assert torch.all(out[:, :, 16:] == 0)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)]
)
def test_preprocess_clip_rejects_non_rgb_uint8(bad):
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess_clip(bad, 32, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["vit-plain", "resnet"])
def test_cuda_matches_cpu(model_dirs, name):
    spec = ClipSpec("local-dir:" + str(model_dirs[name]))
    cpu, gpu = load_dense_clip(spec), load_dense_clip(spec, device="cuda")
    pixels = _pixels(cpu)
    for a, b in zip(cpu(pixels), gpu(pixels.cuda())):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = gpu(pixels.cuda())
    assert all(torch.isfinite(t).all() for t in low)
