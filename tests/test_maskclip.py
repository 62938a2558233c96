"""MaskCLIP dense labels: each function against a plain loop / numpy version."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchseg.io.geometry import letterbox
from batchseg.labels.maskclip import (
    crop_labels_to_original,
    crop_to_original,
    dense_logits,
    fuse_canvases,
    key_smoothing,
    maskclip_probs,
    prompt_denoise,
    upsample_to_canvas,
)

# ------------------------------------------------------------ references (numpy, loops)


def ref_logits(dense, classifier, temperature):
    d, h, w = dense.shape
    out = np.zeros((classifier.shape[0], h, w))
    for y in range(h):
        for x in range(w):
            f = dense[:, y, x] / np.linalg.norm(dense[:, y, x])
            for c in range(classifier.shape[0]):
                t = classifier[c] / np.linalg.norm(classifier[c])
                out[c, y, x] = temperature * float(np.dot(f, t))
    return out


def ref_affinity(keys, affinity):
    k = keys.reshape(keys.shape[0], -1).astype(np.float64)  # (K, P)
    n_pos = k.shape[1]
    a = np.zeros((n_pos, n_pos))
    if affinity == "cosine":
        norms = [np.linalg.norm(k[:, p]) for p in range(n_pos)]
        for p in range(n_pos):
            for q in range(n_pos):
                a[p, q] = np.dot(k[:, p], k[:, q]) / (norms[p] * norms[q])
    else:  # each channel unit-norm across positions
        chan = [np.linalg.norm(k[c]) for c in range(k.shape[0])]
        for p in range(n_pos):
            for q in range(n_pos):
                a[p, q] = sum(k[c, p] * k[c, q] / chan[c] ** 2 for c in range(k.shape[0]))
    return a


def ref_smooth(scores, keys, affinity="cosine", only_below=None):
    c, h, w = scores.shape
    s = scores.reshape(c, -1).astype(np.float64)
    a = ref_affinity(keys, affinity)
    out = s.copy()
    for p in range(h * w):
        if only_below is not None and s[:, p].max() >= only_below:
            continue
        for cls in range(c):
            out[cls, p] = sum(a[p, q] * s[cls, q] for q in range(h * w))
    return out.reshape(c, h, w)


def ref_softmax(x):
    x = x - np.max(np.where(np.isfinite(x), x, -np.inf), axis=0, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=0, keepdims=True)


def ref_denoise(probs, thresh):
    peaks = [probs[c].max() for c in range(probs.shape[0])]
    keep = [p >= thresh for p in peaks]
    if not any(keep):
        keep[int(np.argmax(peaks))] = True
    return np.array(keep)


def ref_bilinear(img, out_h, out_w):
    """align_corners=False bilinear, written out (PyTorch's source-index rule)."""
    c, in_h, in_w = img.shape
    out = np.zeros((c, out_h, out_w))

    def src(i, n_in, n_out):
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    for oy in range(out_h):
        y0, y1, ly = src(oy, in_h, out_h)
        for ox in range(out_w):
            x0, x1, lx = src(ox, in_w, out_w)
            out[:, oy, ox] = (
                (1 - ly) * (1 - lx) * img[:, y0, x0]
                + (1 - ly) * lx * img[:, y0, x1]
                + ly * (1 - lx) * img[:, y1, x0]
                + ly * lx * img[:, y1, x1]
            )
    return out


def ref_nearest(labels, out_h, out_w):
    in_h, in_w = labels.shape[-2:]
    out = np.zeros(labels.shape[:-2] + (out_h, out_w), dtype=labels.dtype)
    for oy in range(out_h):
        sy = min(int(math.floor((oy + 0.5) * in_h / out_h)), in_h - 1)
        for ox in range(out_w):
            sx = min(int(math.floor((ox + 0.5) * in_w / out_w)), in_w - 1)
            out[..., oy, ox] = labels[..., sy, sx]
    return out


def official_refine(cos, keys, pd_thresh, ks_thresh):
    """The official MaskClipHead.refine_output semantics, for one image, in torch.

    cos: (C, h, w) cosine logits; keys (K, h, w). Prompt denoising sets removed
    classes' cosine to -100, then softmax(100 x) and smoothing with keys
    normalised along the position axis (F.normalize's default dim=1 of (N, HW, K)).
    """
    out = cos.clone()[None]
    n, c, h, w = out.shape
    if pd_thresh > 0:
        peak = F.softmax(out * 100, dim=1).view(n, c, -1).max(dim=-1)[0]
        out[(peak < pd_thresh)[:, :, None, None].expand(n, c, h, w)] = -100
    out = F.softmax(out * 100, dim=1).view(n, c, -1).transpose(-2, -1)  # (N, HW, C)
    k = keys.reshape(1, keys.shape[0], -1).transpose(-2, -1)  # (N, HW, K)
    k = F.normalize(k, p=2)
    weight = k @ k.transpose(-2, -1)
    selected = (out.max(dim=-1, keepdim=True)[0] < ks_thresh).expand(-1, -1, c)
    smoothed = weight @ out
    out[selected] = smoothed[selected]
    return out.transpose(-2, -1).reshape(c, h, w)


# ------------------------------------------------------------ dense_logits


@pytest.mark.parametrize("shape", [(8, 3, 5), (16, 4, 4), (4, 1, 7)])
def test_dense_logits_matches_loops(shape):
    g = torch.Generator().manual_seed(sum(shape))
    dense = torch.randn(*shape, generator=g)
    classifier = torch.randn(5, shape[0], generator=g)
    got = dense_logits(dense.half(), classifier, temperature=7.0)  # fp16 storage is fine
    want = ref_logits(dense.half().double().numpy(), classifier.double().numpy(), 7.0)
    assert got.dtype == torch.float32 and got.shape == (5, shape[1], shape[2])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=1e-5)
    assert got.abs().max() <= 7.0 + 1e-4


# ------------------------------------------------------------ key smoothing


@pytest.mark.parametrize("affinity", ["cosine", "maskclip"])
@pytest.mark.parametrize("only_below", [None, 0.6])
def test_key_smoothing_matches_loops(affinity, only_below):
    g = torch.Generator().manual_seed(3)
    scores = torch.softmax(torch.randn(4, 3, 5, generator=g) * 2, dim=0)
    keys = torch.randn(6, 3, 5, generator=g)
    got = key_smoothing(scores, keys, affinity=affinity, only_below=only_below)
    want = ref_smooth(scores.double().numpy(), keys.double().numpy(), affinity, only_below)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-5)
    if only_below is not None:  # confident positions are untouched
        conf = scores.max(dim=0).values >= only_below
        assert conf.any() and (~conf).any()
        torch.testing.assert_close(got[:, conf], scores[:, conf])


@pytest.mark.parametrize("affinity", ["cosine", "maskclip"])
def test_identical_keys_give_identical_smoothed_scores(affinity):
    # Hand-made 2x3 grid: positions (0,0) and (1,2) have the same key but
    # very different scores; after smoothing they must agree exactly.
    keys = torch.tensor(
        [[[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]],
         [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]],
         [[3.0, 1.0, 1.0], [0.0, 1.0, 3.0]]]
    )  # (K=3, 2, 3); key at (0,0) = (1,0,3) = key at (1,2)
    scores = torch.tensor(
        [[[0.9, 0.2, 0.1], [0.3, 0.3, 0.1]],
         [[0.1, 0.8, 0.9], [0.7, 0.7, 0.9]]]
    )
    out = key_smoothing(scores, keys, affinity=affinity)
    torch.testing.assert_close(out[:, 0, 0], out[:, 1, 2])
    assert not torch.allclose(out[:, 0, 0], out[:, 0, 1])


def test_cosine_affinity_ignores_key_scale_per_position():
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(3, 4, 4, generator=g)
    keys = torch.randn(8, 4, 4, generator=g)
    scaled = keys.clone()
    scaled[:, 1, 2] *= 10.0
    torch.testing.assert_close(key_smoothing(scores, keys), key_smoothing(scores, scaled))


def test_key_smoothing_shape_mismatch():
    with pytest.raises(ValueError):
        key_smoothing(torch.rand(3, 4, 4), torch.rand(8, 4, 5))
    with pytest.raises(ValueError):
        key_smoothing(torch.rand(3, 4, 4), torch.rand(8, 4, 4), affinity="softmax")


# ------------------------------------------------------------ prompt denoising


def _probs_with_peaks(peaks, h=3, w=4):
    """(C, h, w) maps whose per-class maxima are exactly ``peaks``."""
    c = len(peaks)
    p = torch.zeros(c, h, w)
    for i, v in enumerate(peaks):
        p[i].fill_(v / 4)
        p[i, i % h, (2 * i) % w] = v
    return p


@pytest.mark.parametrize(
    "peaks,thresh,expected",
    [
        ([0.9, 0.2, 0.6], 0.5, [True, False, True]),
        ([0.5, 0.49999, 0.7], 0.5, [True, False, True]),  # exactly at thresh is kept
        ([0.3, 0.4, 0.4], 0.5, [False, True, False]),  # all below: keep the best (first on ties)
        ([0.3, 0.2], 0.0, [True, True]),  # thresh 0 keeps everything
        ([0.3, 0.2], 1.0, [True, False]),
        ([1.0, 0.2], 1.0, [True, False]),
    ],
)
def test_prompt_denoise_table(peaks, thresh, expected):
    probs = _probs_with_peaks(peaks)
    got = prompt_denoise(probs, thresh)
    assert got.dtype == torch.bool
    assert got.tolist() == expected
    assert got.tolist() == ref_denoise(probs.numpy(), thresh).tolist()


def test_prompt_denoise_random_matches_reference():
    g = torch.Generator().manual_seed(11)
    for _ in range(20):
        probs = torch.softmax(torch.randn(6, 5, 5, generator=g) * 2, dim=0)
        assert prompt_denoise(probs, 0.5).tolist() == ref_denoise(probs.numpy(), 0.5).tolist()


# ------------------------------------------------------------ the whole thing


def _scene(seed, c=5, d=16, h=4, w=6, k=8):
    """Features made of a few class directions so denoising has work to do."""
    g = torch.Generator().manual_seed(seed)
    classifier = F.normalize(torch.randn(c, d, generator=g), dim=1)
    # Only classes 0 and 1 are really present; the rest appear weakly.
    mix = torch.rand(c, h, w, generator=g) * 0.2
    mix[0, :, : w // 2] += 1.0
    mix[1, :, w // 2 :] += 1.0
    dense = torch.einsum("cd,chw->dhw", classifier, mix) + 0.05 * torch.randn(d, h, w, generator=g)
    keys = torch.rand(k, h, w, generator=g)  # non-negative: affinities are non-negative
    return dense, keys, classifier


def ref_maskclip_probs(dense, keys, classifier, ks, pd, pd_thresh, temperature, affinity, ks_thresh=None):
    logits = ref_logits(dense, classifier, temperature)
    if pd:
        keep = ref_denoise(ref_softmax(logits), pd_thresh)
        logits[~keep] = -np.inf
    probs = ref_softmax(logits)
    if ks:
        sm = np.clip(ref_smooth(probs, keys, affinity, ks_thresh), 0, None)
        total = sm.sum(axis=0, keepdims=True)
        probs = np.where(total > 0, sm / np.where(total > 0, total, 1), probs)
    return probs


@pytest.mark.parametrize("ks", [False, True])
@pytest.mark.parametrize("pd", [False, True])
@pytest.mark.parametrize("affinity", ["cosine", "maskclip"])
def test_maskclip_probs_matches_reference(ks, pd, affinity):
    dense, keys, classifier = _scene(1)
    temperature = 10.0
    got = maskclip_probs(
        dense, keys, classifier, key_smoothing=ks, prompt_denoising=pd,
        pd_thresh=0.5, temperature=temperature, affinity=affinity,
    )
    want = ref_maskclip_probs(
        dense.double().numpy(), keys.double().numpy(), classifier.double().numpy(),
        ks, pd, 0.5, temperature, affinity,
    )
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    torch.testing.assert_close(got.sum(dim=0), torch.ones(got.shape[1:]))
    assert (got >= 0).all()
    if pd:  # the scene is built so that denoising removes the weak classes exactly
        removed = ~prompt_denoise(torch.softmax(dense_logits(dense, classifier, temperature), 0))
        assert removed.any() and (~removed).any()
        assert (got[removed] == 0).all()


def test_maskclip_probs_all_below_threshold_keeps_best_class():
    dense, keys, classifier = _scene(2)
    probs = maskclip_probs(
        dense, keys, classifier, key_smoothing=False, prompt_denoising=True,
        pd_thresh=1.1, temperature=10.0,
    )
    kept = (probs > 0).flatten(1).any(dim=1)
    assert kept.sum() == 1
    torch.testing.assert_close(probs[kept][0], torch.ones(probs.shape[1:]))


def test_maskclip_probs_agrees_with_official_refine_output():
    # Official: logits stay cosine, x100 inside softmax, PD to -100, KS with the
    # 'maskclip' affinity and ks_thresh. Ours only renormalises at the end.
    dense, keys, classifier = _scene(4)
    cos = dense_logits(dense, classifier, temperature=1.0)
    official = official_refine(cos, keys, pd_thresh=0.5, ks_thresh=1.0)
    ours = maskclip_probs(
        dense, keys, classifier, key_smoothing=True, prompt_denoising=True,
        pd_thresh=0.5, temperature=100.0, ks_thresh=1.0, affinity="maskclip",
    )
    torch.testing.assert_close(ours, official / official.sum(dim=0, keepdim=True))
    assert torch.equal(ours.argmax(dim=0), official.argmax(dim=0))


def test_maskclip_probs_needs_keys_for_smoothing():
    dense, _, classifier = _scene(0)
    with pytest.raises(ValueError):
        maskclip_probs(dense, None, classifier, key_smoothing=True, prompt_denoising=False)


# ------------------------------------------------------------ back to original pixels


@pytest.mark.parametrize("grid,canvas", [(2, 32), (4, 32), (3, 16)])
def test_upsample_to_canvas_matches_reference(grid, canvas):
    g = torch.Generator().manual_seed(grid)
    probs = torch.softmax(torch.randn(3, grid, grid, generator=g), dim=0)
    got = upsample_to_canvas(probs, canvas)
    assert got.shape == (3, canvas, canvas)
    np.testing.assert_allclose(got.numpy(), ref_bilinear(probs.double().numpy(), canvas, canvas), atol=1e-5)
    torch.testing.assert_close(got.sum(dim=0), torch.ones(canvas, canvas))


@pytest.mark.parametrize("height,width", [(30, 50), (50, 30), (10, 12), (7, 7), (1, 40)])
def test_crop_to_original_matches_reference(height, width):
    canvas = 32
    lb = letterbox(height, width, canvas)
    g = torch.Generator().manual_seed(height * 100 + width)
    maps = torch.softmax(torch.randn(3, canvas, canvas, generator=g), dim=0)
    got = crop_to_original(maps, lb.valid_h, lb.valid_w, lb.height, lb.width)
    assert got.shape == (3, height, width)
    cropped = maps[:, : lb.valid_h, : lb.valid_w].double().numpy()
    np.testing.assert_allclose(got.numpy(), ref_bilinear(cropped, height, width), atol=1e-5)
    torch.testing.assert_close(got.sum(dim=0), torch.ones(height, width))


def test_crop_to_original_30x50_geometry():
    lb = letterbox(30, 50, 32)
    assert (lb.valid_h, lb.valid_w) == (19, 32)
    # A map that is 1 on the valid region and 0 on the padding maps back to all ones:
    # no padding leaks into original pixels.
    maps = torch.zeros(1, 32, 32)
    maps[:, :19, :32] = 1.0
    out = crop_to_original(maps, lb.valid_h, lb.valid_w, 30, 50)
    torch.testing.assert_close(out, torch.ones(1, 30, 50))


@pytest.mark.parametrize("height,width", [(30, 50), (50, 30), (10, 12), (1, 40), (64, 64)])
def test_crop_labels_to_original_matches_reference(height, width):
    canvas = 32
    lb = letterbox(height, width, canvas)
    g = torch.Generator().manual_seed(height + width)
    labels = torch.randint(0, 5, (canvas, canvas), generator=g)
    got = crop_labels_to_original(labels, lb.valid_h, lb.valid_w, height, width)
    assert got.dtype == labels.dtype and got.shape == (height, width)
    want = ref_nearest(labels[: lb.valid_h, : lb.valid_w].numpy(), height, width)
    np.testing.assert_array_equal(got.numpy(), want)
    # Same rule as PyTorch's pixel-centre nearest.
    exact = F.interpolate(
        labels[None, None, : lb.valid_h, : lb.valid_w].float(), size=(height, width), mode="nearest-exact"
    )[0, 0].long()
    assert torch.equal(got, exact)


def test_crop_labels_batched_bool():
    masks = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    lb = letterbox(20, 9, 16)
    got = crop_labels_to_original(masks, lb.valid_h, lb.valid_w, 20, 9)
    assert got.dtype == torch.bool and got.shape == (2, 20, 9)
    for i in range(2):
        np.testing.assert_array_equal(
            got[i].numpy(), ref_nearest(masks[i, : lb.valid_h, : lb.valid_w].numpy(), 20, 9)
        )


def test_crop_rejects_bad_regions():
    with pytest.raises(ValueError):
        crop_to_original(torch.rand(1, 8, 8), 9, 8, 10, 10)
    with pytest.raises(ValueError):
        crop_labels_to_original(torch.zeros(8, 8, dtype=torch.long), 0, 8, 10, 10)


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.8])
def test_fuse_canvases_is_the_softmax_of_the_weighted_mean_logit(weight):
    g = torch.Generator().manual_seed(3)
    coarse_logits, fine_logits = torch.randn(5, 6, 7, generator=g) * 4, torch.randn(5, 6, 7, generator=g) * 4
    fused = fuse_canvases(torch.softmax(coarse_logits, 0), torch.softmax(fine_logits, 0), weight)
    expected = torch.softmax((1 - weight) * coarse_logits + weight * fine_logits, 0)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.sum(0), torch.ones(6, 7))


def test_fuse_canvases_ends_are_the_canvases_and_a_removed_class_stays_removed():
    g = torch.Generator().manual_seed(4)
    coarse, fine = torch.softmax(torch.randn(4, 3, 3, generator=g), 0), torch.softmax(torch.randn(4, 3, 3, generator=g), 0)
    assert torch.equal(fuse_canvases(coarse, fine, 0.0), coarse) and torch.equal(fuse_canvases(coarse, fine, 1.0), fine)
    denoised = coarse.clone()
    denoised[2] = 0  # prompt denoising removed class 2 on the coarse canvas
    denoised /= denoised.sum(0, keepdim=True)
    assert fuse_canvases(denoised, fine, 0.5)[2].max() < 1e-5


@pytest.mark.parametrize("coarse_shape, fine_shape, weight, message", [
    ((3, 4, 4), (3, 4, 5), 0.5, "one shape"),
    ((3, 4, 4), (3, 4, 4), 1.5, "fine_weight must be in"),
])
def test_fuse_canvases_refuses_bad_input(coarse_shape, fine_shape, weight, message):
    with pytest.raises(ValueError, match=message):
        fuse_canvases(torch.full(coarse_shape, 1 / 3), torch.full(fine_shape, 1 / 3), weight)
