"""MaskCLIP dense labels from stored dense CLIP features (no model needed here).

Inputs are what the ``embed`` stage stores per image: dense features ``(D, h, w)``
on the patch grid of the square canvas, and the last block's keys ``(K, h, w)``
for key smoothing. Outputs are per-class probability maps that are then mapped
back to original pixels with the letterbox geometry.

Order of operations, as in the official MaskCLIP head (``MaskClipHead.refine_output``):

1. ``logits = temperature * cos(feature, text)`` per position and class.
2. Prompt denoising (optional): ``p = softmax(logits)`` over classes; a class whose
   maximum of ``p`` over all positions is below the threshold is removed by
   setting its logits to ``-inf`` (official: cosine ``-100``, i.e. ``-1e4`` after
   the x100 scale, which underflows to probability 0 the same way).
3. ``probs = softmax(logits)`` over classes.
4. Key smoothing (optional) on the *probabilities*, not on logits: each position's
   class scores become an affinity-weighted sum of every position's scores, the
   affinity coming from the last block's keys.

So denoising happens before smoothing, and smoothing sees probabilities.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Affinity = Literal["cosine", "maskclip"]


def dense_logits(dense: Tensor, classifier: Tensor, temperature: float = 100.0) -> Tensor:
    """Scaled cosine similarity between each position's feature and each class.

    Args:
        dense: ``(D, h, w)`` dense CLIP features, any float dtype.
        classifier: ``(C, D)`` text classifier (rows are re-normalised, so
            non-unit rows are fine).
        temperature: multiplier on the cosine (CLIP's logit scale; MaskCLIP uses 100).

    Returns:
        float32 ``(C, h, w)``, values in ``[-temperature, temperature]``.
    """
    if dense.ndim != 3 or classifier.ndim != 2 or dense.shape[0] != classifier.shape[1]:
        raise ValueError(
            f"expected dense (D,h,w) and classifier (C,D), got {tuple(dense.shape)} "
            f"and {tuple(classifier.shape)}"
        )
    feats = F.normalize(dense.float(), dim=0)  # unit vector per position
    text = F.normalize(classifier.float().to(feats.device), dim=1)
    return torch.einsum("cd,dhw->chw", text, feats) * temperature


def key_smoothing(
    scores: Tensor,
    keys: Tensor,
    *,
    affinity: Affinity = "cosine",
    only_below: float | None = None,
) -> Tensor:
    """Smooth class scores with the affinity of the last ViT block's keys.

    ``smoothed[:, p] = sum_q A[p, q] * scores[:, q]`` with ``A = kn^T kn`` where
    ``kn`` is the ``(K, h*w)`` key matrix after normalisation:

    - ``affinity="cosine"`` (default): each position's key is L2-normalised over
      its ``K`` channels, so ``A[p, q]`` is the cosine similarity of the two keys,
      in ``[-1, 1]`` with ``A[p, p] = 1``. It depends only on the two positions
      involved, not on the rest of the image or on how many positions there are.
    - ``affinity="maskclip"``: the official code's form. It computes
      ``F.normalize(k, p=2)`` on ``k`` of shape ``(N, h*w, K)``, whose default
      ``dim=1`` is the *position* axis: each key channel is scaled to unit norm
      across the image, so ``A[p, q] = sum_c k_c(p) k_c(q) / ||k_c||^2``. Its scale
      shrinks as the grid grows and one position's affinity depends on every
      other position, which is why we default to the per-position (cosine) form.

    The ``(h*w, h*w)`` affinity is never materialised: ``(scores @ kn^T) @ kn`` is
    the same product in ``O(C*K*h*w)`` memory and time instead of ``O((h*w)^2)``.

    Args:
        scores: ``(C, h, w)`` class scores (MaskCLIP passes probabilities).
        keys: ``(K, h, w)`` keys of the last block, any float dtype.
        affinity: ``"cosine"`` or ``"maskclip"``, see above.
        only_below: official ``ks_thresh``: if given, only positions whose
            maximum score is ``< only_below`` are replaced by their smoothed
            scores; others keep their own. ``None`` smooths every position.

    Returns:
        float32 ``(C, h, w)``. Not a distribution: rows are weighted *sums*, and
        with negative affinities values can be negative.
    """
    if scores.ndim != 3 or keys.ndim != 3 or scores.shape[1:] != keys.shape[1:]:
        raise ValueError(
            f"expected scores (C,h,w) and keys (K,h,w) on the same grid, got "
            f"{tuple(scores.shape)} and {tuple(keys.shape)}"
        )
    c, h, w = scores.shape
    s = scores.float().reshape(c, h * w)
    k = keys.float().to(s.device).reshape(keys.shape[0], h * w)
    if affinity == "cosine":
        kn = F.normalize(k, dim=0)  # over channels, per position
    elif affinity == "maskclip":
        kn = F.normalize(k, dim=1)  # over positions, per channel (official)
    else:
        raise ValueError(f"unknown affinity {affinity!r}; use 'cosine' or 'maskclip'")
    # A is symmetric, so scores @ A^T == scores @ A == (scores @ kn^T) @ kn.
    smoothed = (s @ kn.T) @ kn
    if only_below is not None:
        selected = s.max(dim=0).values < only_below  # (h*w,)
        smoothed = torch.where(selected[None, :], smoothed, s)
    return smoothed.reshape(c, h, w)


def prompt_denoise(probs: Tensor, thresh: float = 0.5) -> Tensor:
    """Which classes survive MaskCLIP's prompt denoising.

    A class is removed when its probability is below ``thresh`` at every position
    (``max < thresh``; a maximum exactly equal to ``thresh`` is kept, matching the
    official strict ``<``).

    If every class would be removed we keep the one with the highest maximum
    (lowest class id on ties). The official code would then set all logits to
    the same value and output a uniform map whose argmax is class 0 whatever the
    image shows; keeping the most confident class gives the image its best label.

    Args:
        probs: ``(C, h, w)`` probabilities over classes.
        thresh: the denoising threshold (MaskCLIP: 0.5).

    Returns:
        bool ``(C,)``, ``True`` for kept classes; at least one is ``True``.
    """
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"expected probs (C,h,w) with C >= 1, got {tuple(probs.shape)}")
    peak = probs.reshape(probs.shape[0], -1).max(dim=1).values  # (C,)
    keep = peak >= thresh
    if not bool(keep.any()):
        keep[int(torch.argmax(peak))] = True  # argmax returns the first maximum
    return keep


def maskclip_probs(
    dense: Tensor,
    keys: Tensor | None,
    classifier: Tensor,
    *,
    key_smoothing: bool,
    prompt_denoising: bool,
    pd_thresh: float = 0.5,
    temperature: float = 100.0,
    ks_thresh: float | None = None,
    affinity: Affinity = "cosine",
) -> Tensor:
    """MaskCLIP class probabilities on the feature grid.

    Steps (official order, see the module docstring): logits -> prompt denoising
    (removed classes' logits to ``-inf``) -> softmax -> key smoothing on the
    probabilities -> back to a distribution.

    The last step is ours: the official code leaves the smoothed sums as they are
    (only their argmax is used). We clamp negatives to 0 and divide by the sum
    over classes so the output stays a distribution usable as a score; this is
    a positive per-position rescaling and does not move the argmax where the
    largest smoothed score is positive. A position whose smoothed scores are all
    ``<= 0`` keeps its unsmoothed probabilities.

    Args:
        dense: ``(D, h, w)`` dense CLIP features.
        keys: ``(K, h, w)`` last-block keys; required when ``key_smoothing``.
        classifier: ``(C, D)`` text classifier.
        key_smoothing: apply key smoothing.
        prompt_denoising: apply prompt denoising with ``pd_thresh``.
        pd_thresh: class kept iff its max probability over the image ``>= pd_thresh``.
        temperature: logit scale applied to the cosine similarities.
        ks_thresh: official ``ks_thresh``; ``None`` smooths every position.
        affinity: key affinity form, see :func:`key_smoothing`.

    Returns:
        float32 ``(C, h, w)``, non-negative, summing to 1 over classes at every
        position; removed classes are exactly 0.
    """
    logits = dense_logits(dense, classifier, temperature)
    if prompt_denoising:
        keep = prompt_denoise(torch.softmax(logits, dim=0), pd_thresh)
        logits = logits.masked_fill(~keep[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=0)  # exp(-inf) == 0: removed classes are exactly 0
    if not key_smoothing:
        return probs
    if keys is None:
        raise ValueError("key smoothing needs the last block's keys, got keys=None")
    smoothed = _smooth(probs, keys, affinity=affinity, only_below=ks_thresh).clamp_min(0)
    total = smoothed.sum(dim=0, keepdim=True)
    ok = total > 0
    return torch.where(ok, smoothed / torch.where(ok, total, 1.0), probs)


def fuse_canvases(coarse: Tensor, fine: Tensor, fine_weight: float) -> Tensor:
    """Two canvases' class probabilities as one: the softmax of their weighted mean logit.

    The multi-scale rule of semantic segmentation (average the scales' logits). Since
    ``log softmax(z) = z - logsumexp(z)``, averaging log-probabilities is averaging
    logits up to a per-pixel constant, so this equals ``softmax((1-w) z_coarse + w z_fine)``
    for the logits that gave them: the product of the probabilities raised to their
    weights, renormalised. A class one canvas's prompt denoising removed (probability 0)
    keeps at most ``1e-12 ** w`` of its share; it is not revived by the other canvas.

    Args:
        coarse, fine: ``(C, H, W)`` probabilities on the same pixels, each summing to 1 over C.
        fine_weight: ``w`` in ``[0, 1]``; 0 returns ``coarse`` itself, 1 ``fine``.

    Returns:
        float32 ``(C, H, W)`` summing to 1 over C.
    """
    if coarse.shape != fine.shape:
        raise ValueError(f"both canvases' maps must have one shape, got {tuple(coarse.shape)} and {tuple(fine.shape)}")
    if not 0.0 <= fine_weight <= 1.0:
        raise ValueError(f"fine_weight must be in [0, 1], got {fine_weight}")
    if fine_weight == 0.0:
        return coarse.float()
    if fine_weight == 1.0:
        return fine.float()
    tiny = 1e-12
    logits = (1.0 - fine_weight) * coarse.float().clamp_min(tiny).log() + fine_weight * fine.float().clamp_min(tiny).log()
    return torch.softmax(logits, dim=0)


# maskclip_probs has a parameter named key_smoothing that shadows the function.
_smooth = key_smoothing


def upsample_to_canvas(probs: Tensor, canvas: int) -> Tensor:
    """Bilinear upsampling of ``(C, h, w)`` maps to ``(C, canvas, canvas)``.

    ``align_corners=False`` (pixel-centre convention), like mmseg's resize in
    MaskCLIP. Bilinear weights are convex, so probabilities stay probabilities.
    Returns float32.
    """
    if probs.ndim != 3:
        raise ValueError(f"expected (C,h,w), got {tuple(probs.shape)}")
    out = F.interpolate(
        probs.float()[None], size=(canvas, canvas), mode="bilinear", align_corners=False
    )
    return out[0]


def _check_crop(shape: tuple[int, ...], valid_h: int, valid_w: int, height: int, width: int) -> None:
    if not (0 < valid_h <= shape[-2] and 0 < valid_w <= shape[-1]):
        raise ValueError(f"valid region {valid_h}x{valid_w} does not fit a {shape[-2]}x{shape[-1]} map")
    if height < 1 or width < 1:
        raise ValueError(f"original size must be positive, got {height}x{width}")


def crop_to_original(
    maps: Tensor, valid_h: int, valid_w: int, height: int, width: int
) -> Tensor:
    """Canvas maps back to original pixels (probabilities / scores): bilinear.

    Crops the letterbox's valid region ``[:valid_h, :valid_w]`` (padding is
    bottom/right, see ``batchseg.io.geometry.letterbox``) and resizes it to
    ``height x width`` with ``align_corners=False``.

    Args:
        maps: ``(C, canvas, canvas)`` float maps.

    Returns:
        float32 ``(C, height, width)``.
    """
    if maps.ndim != 3:
        raise ValueError(f"expected (C,canvas,canvas), got {tuple(maps.shape)}")
    _check_crop(tuple(maps.shape), valid_h, valid_w, height, width)
    valid = maps[:, :valid_h, :valid_w].float()
    return F.interpolate(valid[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def _nearest_index(n_out: int, n_in: int, device: torch.device) -> Tensor:
    # Pixel-centre nearest neighbour: output pixel i samples input
    # floor((i + 0.5) * n_in / n_out), the same rule as mode="nearest-exact".
    # Integer arithmetic keeps it exact (no float rounding at .5 boundaries).
    i = torch.arange(n_out, device=device, dtype=torch.int64)
    return ((2 * i + 1) * n_in // (2 * n_out)).clamp_max(n_in - 1)


def crop_labels_to_original(
    labels: Tensor, valid_h: int, valid_w: int, height: int, width: int
) -> Tensor:
    """Canvas label maps back to original pixels: crop, then nearest neighbour.

    Nearest, because interpolating class ids would invent classes. Works for any
    dtype (ids, bool masks) and keeps it.

    Args:
        labels: ``(canvas, canvas)`` or ``(N, canvas, canvas)``.

    Returns:
        ``(height, width)`` or ``(N, height, width)``, same dtype as ``labels``.
    """
    if labels.ndim not in (2, 3):
        raise ValueError(f"expected (canvas,canvas) or (N,canvas,canvas), got {tuple(labels.shape)}")
    _check_crop(tuple(labels.shape), valid_h, valid_w, height, width)
    rows = _nearest_index(height, valid_h, labels.device)
    cols = _nearest_index(width, valid_w, labels.device)
    return labels[..., rows[:, None], cols[None, :]]
