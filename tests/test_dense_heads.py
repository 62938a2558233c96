"""Dense heads from stored tokens against independent references.

Each ViT head is compared with the *whole* open_clip model run on the same pixels,
with that head's attention substituted inside open_clip's own last block (written
here loop by loop over images and attention heads, from the papers' formulas), and
its output taken from open_clip's own ``ln_post`` tokens and ``proj``. ``proxy-sam``
is compared with a direct loop-level implementation of ProxyCLIP's formula.
"""
from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batchseg.errors import UsageError
from batchseg.models.clip import ClipSpec, DenseClip, load_dense_clip, save_local_dir, tiny_clip_config
from batchseg.models.dense_heads import (
    DenseHeadSettings,
    check_head_supported,
    compute_head,
    neighbourhood_bias,
    proxy_attention,
)

VIT_VARIANTS = {"plain": {}, "layer_scale": {"ls_init_value": 0.5}, "patch16": {"patch_size": 16, "image_size": 64}}
# head -> (attention rule, keeps the block's residual + MLP)
VIT_HEADS = {
    "maskclip": ("diagonal", True),
    "value": ("diagonal", False),
    "clearclip": ("qq", False),
    "sclip": ("qq+kk", True),
    "naclip": ("kk+window", False),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, DenseClip]:
    root = tmp_path_factory.mktemp("dense_heads")
    out = {}
    for name, extra in VIT_VARIANTS.items():
        cfg = tiny_clip_config("vit")
        cfg["vision_cfg"].update(extra)
        out[name] = _jittered(save_local_dir(cfg, root / name, seed=3))
    out["resnet"] = _jittered(save_local_dir(tiny_clip_config("resnet"), root / "resnet", seed=4))
    return out


def _jittered(path: Path) -> DenseClip:
    """Jitter every parameter so zero biases and unit layer scales hide nothing."""
    dc = load_dense_clip(ClipSpec("local-dir:" + str(path)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dc.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return dc


def _pixels(dc: DenseClip, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, dc.canvas, dc.canvas, generator=torch.Generator().manual_seed(seed))


def _reference_attention(attn, x: torch.Tensor, rule: str, grid: int, std: float) -> torch.Tensor:
    """(B, L, W) ln_1 output -> out_proj(attention output), one image and head at a time."""
    width = x.shape[-1]
    heads = attn.num_heads
    hd = width // heads
    wq, wk, wv = attn.in_proj_weight.split(width)
    bq, bk, bv = attn.in_proj_bias.split(width)
    length = x.shape[1]
    bias = torch.zeros(length, length)
    for i in range(1, length):  # token 0 is the class token: no neighbourhood term
        for j in range(1, length):
            yi, xi = divmod(i - 1, grid)
            yj, xj = divmod(j - 1, grid)
            bias[i, j] = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * std * std))
    images = []
    for b in range(x.shape[0]):
        outs = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            q = x[b] @ wq[sl].T + bq[sl]
            k = x[b] @ wk[sl].T + bk[sl]
            v = x[b] @ wv[sl].T + bv[sl]
            scale = 1.0 / math.sqrt(hd)
            if rule == "diagonal":
                weights = torch.eye(length)
            elif rule == "qq":
                weights = torch.softmax(q @ q.T * scale, dim=-1)
            elif rule == "qq+kk":
                weights = torch.softmax(q @ q.T * scale, dim=-1) + torch.softmax(k @ k.T * scale, dim=-1)
            else:
                weights = torch.softmax(k @ k.T * scale + bias, dim=-1)
            outs.append(weights @ v)
        images.append(attn.out_proj(torch.cat(outs, dim=-1)))
    return torch.stack(images)


def _whole_model_reference(dc: DenseClip, pixels: torch.Tensor, head: str, std: float = 5.0) -> torch.Tensor:
    """open_clip's own forward with the last block's attention replaced: (B, D, g, g)."""
    visual = dc.model.visual
    block = visual.transformer.resblocks[-1]
    rule, keeps_block = VIT_HEADS[head]
    substitute = lambda x: _reference_attention(block.attn, x, rule, dc.grid, std)  # noqa: E731
    saved_attention, saved_forward = block.attention, block.forward
    if keeps_block:
        block.attention = lambda q_x, k_x=None, v_x=None, attn_mask=None: substitute(q_x)
    else:
        block.forward = lambda q_x, k_x=None, v_x=None, attn_mask=None: substitute(block.ln_1(q_x))
    visual.output_tokens = True
    try:
        _, tokens = visual(pixels)
    finally:
        visual.output_tokens = False
        block.attention, block.forward = saved_attention, saved_forward
    dense = tokens @ visual.proj
    return dense.reshape(dense.shape[0], dc.grid, dc.grid, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
@pytest.mark.parametrize("head", list(VIT_HEADS))
def test_vit_head_from_tokens_equals_whole_model_with_that_attention(clips, variant, head):
    dc = clips[variant]
    pixels = _pixels(dc)
    with torch.no_grad():
        stored = dc.encode_tokens(pixels)
        got = compute_head(dc, DenseHeadSettings(head), stored.tokens, stored.cls)
        want = _whole_model_reference(dc, pixels, head)
    assert got.dense.shape == (2, dc.dense_dim, dc.grid, dc.grid) and got.dense.dtype == torch.float32
    torch.testing.assert_close(got.dense, want, rtol=1e-4, atol=1e-4)


def test_maskclip_head_equals_the_dense_forward_and_its_keys(clips):
    dc = clips["plain"]
    pixels = _pixels(dc)
    with torch.no_grad():
        stored = dc.encode_tokens(pixels)
        got = compute_head(dc, DenseHeadSettings("maskclip"), stored.tokens, stored.cls)
        full = dc(pixels)
    torch.testing.assert_close(got.dense, full.dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.keys, full.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored.global_, dc.model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_resnet_tokens_give_maskclip_and_the_global_embedding(clips):
    dc = clips["resnet"]
    pixels = _pixels(dc)
    with torch.no_grad():
        stored = dc.encode_tokens(pixels)
        got = compute_head(dc, DenseHeadSettings("maskclip"), stored.tokens)
        full = dc(pixels)
    assert stored.cls is None
    torch.testing.assert_close(got.dense, full.dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.keys, full.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored.global_, dc.model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def _loop_proxy_attention(sam: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """ProxyCLIP's formula, position by position, for one image (Cs, G, G)."""
    cs, g, _ = sam.shape
    feats = [sam[:, i // g, i % g] / sam[:, i // g, i % g].norm() for i in range(g * g)]
    s = torch.tensor([[float(a @ b) for b in feats] for a in feats])
    s = gamma * (s - beta * s.mean())
    rows = []
    for i in range(g * g):
        keep = [j for j in range(g * g) if s[i, j] >= 0 or i == j]
        row = torch.zeros(g * g)
        row[keep] = torch.softmax(s[i, keep], dim=0)
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("tower", ["plain", "resnet"])
def test_proxy_sam_equals_loop_level_formula(clips, tower):
    dc = clips[tower]
    pixels = _pixels(dc)
    sam = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(5))
    settings = DenseHeadSettings("proxy-sam")
    with torch.no_grad():
        stored = dc.encode_tokens(pixels)
        got = compute_head(dc, settings, stored.tokens, stored.cls, sam)
        visual = dc.model.visual
        want = []
        for b in range(2):
            weights = _loop_proxy_attention(sam[b], settings.proxy_beta, settings.proxy_gamma)
            tokens = stored.tokens[b].flatten(1).T  # (g*g, W)
            if tower == "resnet":
                values = visual.attnpool.v_proj(tokens)
            else:
                block = visual.transformer.resblocks[-1]
                width = tokens.shape[-1]
                values = block.ln_1(tokens) @ block.attn.in_proj_weight[2 * width :].T + block.attn.in_proj_bias[2 * width :]
            grid = values.T.reshape(1, -1, dc.grid, dc.grid)
            up = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)[0].flatten(1).T
            mixed = weights @ up
            if tower == "resnet":
                dense = visual.attnpool.c_proj(mixed)
            else:
                dense = visual.ln_post(block.attn.out_proj(mixed)) @ visual.proj
            want.append(dense.T.reshape(-1, 8, 8))
    assert got.dense.shape == (2, dc.dense_dim, 8, 8) and got.keys.shape[-2:] == (8, 8)
    torch.testing.assert_close(got.dense, torch.stack(want), rtol=1e-4, atol=1e-4)


def test_proxy_attention_rows_are_distributions_and_keep_the_diagonal():
    sam = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    weights = proxy_attention(sam, beta=1.2, gamma=3.0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 25))
    assert bool((torch.diagonal(weights[0]) > 0).all())
    torch.testing.assert_close(weights[0], _loop_proxy_attention(sam[0], 1.2, 3.0), rtol=1e-5, atol=1e-6)


def test_neighbourhood_bias_is_a_gaussian_of_patch_distance():
    bias = neighbourhood_bias(3, 4, std=2.0, with_cls=True)
    assert bias.shape == (13, 13) and float(bias[0].abs().sum()) == 0.0 and float(bias[:, 0].abs().sum()) == 0.0
    # patch (0, 0) -> token 1, patch (2, 3) -> token 12: squared distance 4 + 9
    assert bias[1, 12].item() == pytest.approx(math.exp(-13 / 8))
    assert bias[5, 5].item() == 1.0


@pytest.mark.parametrize(
    "name, kind, has_sam, message",
    [
        ("clearclip", "resnet", True, "needs a ViT CLIP"),
        ("naclip", "timm", False, "needs a ViT CLIP"),
        ("proxy-sam", "vit", False, "uses the stored SAM embeddings"),
        ("nonsense", "vit", True, "choose one of maskclip, value, clearclip, sclip, naclip, proxy-sam"),
    ],
)
def test_unsupported_combinations_are_usage_errors(name, kind, has_sam, message):
    with pytest.raises(UsageError, match=message):
        check_head_supported(DenseHeadSettings(name), kind, has_sam)


@pytest.mark.parametrize("field, value", [("naclip_std", 0), ("proxy_gamma", -1.0), ("proxy_beta", float("nan"))])
def test_bad_hyper_parameters_are_refused(field, value):
    with pytest.raises(UsageError, match=field):
        DenseHeadSettings(**{field: value}).validate()


def test_proxy_sam_pools_a_fine_sam_grid_to_proxy_grid(clips):
    dc = clips["plain"]
    stored = dc.encode_tokens(_pixels(dc))
    sam = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pooled = compute_head(dc, DenseHeadSettings("proxy-sam", proxy_grid=8), stored.tokens, stored.cls, sam)
        direct = compute_head(dc, DenseHeadSettings("proxy-sam", proxy_grid=8), stored.tokens, stored.cls,
                              F.avg_pool2d(sam, 2))
    assert pooled.dense.shape[-2:] == (8, 8)
    torch.testing.assert_close(pooled.dense, direct.dense)


def test_timm_tower_tokens_give_its_dense_forward(tmp_path):
    from test_clip_timm import timm_config  # the tiny ConvNeXt tower the timm tests build

    dc = _jittered(save_local_dir(timm_config(), tmp_path / "timm", seed=5))
    pixels = _pixels(dc)
    with torch.no_grad():
        stored = dc.encode_tokens(pixels)
        got = compute_head(dc, DenseHeadSettings("maskclip"), stored.tokens)
        full = dc(pixels)
    assert stored.cls is None and stored.tokens.shape[1] == dc.token_dim
    torch.testing.assert_close(got.dense, full.dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored.global_, dc.model.encode_image(pixels), rtol=1e-5, atol=1e-5)
    # proxy-sam on a CNN tower: SAM's attention mixes the feature map, then the head projects.
    sam = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        proxy = compute_head(dc, DenseHeadSettings("proxy-sam"), stored.tokens, None, sam)
        f = F.interpolate(stored.tokens, size=(4, 4), mode="bilinear", align_corners=False)
        for b in range(2):
            mixed = _loop_proxy_attention(sam[b], 1.2, 3.0) @ f[b].flatten(1).T  # (16, C)
            for i in range(16):
                cell = mixed[i].reshape(1, -1, 1, 1)
                want = dc.model.visual.head(dc.model.visual.trunk.forward_head(cell))[0]
                torch.testing.assert_close(proxy.dense[b, :, i // 4, i % 4], want, rtol=1e-4, atol=1e-4)
