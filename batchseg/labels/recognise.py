"""Recognise SAM masks with CLIP: Open-Vocabulary SAM's SAM+CLIP baseline.

SAM proposes class-agnostic masks; MaskCLIP gives per-pixel class probabilities.
Each mask is recognised by pooling the probabilities inside it ("segment, then
recognise"), and the semantic map is refined by letting each mask vote its
region's class, so label boundaries follow SAM's mask boundaries instead of
MaskCLIP's coarse patch grid.

Everything here works in original pixels: ``probs`` is MaskCLIP's output mapped
back with ``batchseg.labels.maskclip.crop_to_original``, and masks are SAM
proposals (``batchseg.labels.proposals.Proposals.masks``).

Pooling is one matrix product: with the masks flattened to an ``(N, H*W)`` 0/1
matrix ``M`` and the probabilities to ``(C, H*W)`` ``P``, ``M @ P^T`` holds each
mask's per-class sum. Masks are processed in chunks so at most ``chunk_elems``
float elements of ``M`` exist at once (``N`` megapixel masks would otherwise need
``4N`` MB). The product is float32: on a GPU that allows TF32 matmuls
(``torch.backends.cuda.matmul.allow_tf32``, off by default) pooled scores lose
about three decimal digits.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["mask_class_scores", "majority_classes", "recognise_masks", "refine_semantic"]

# Float32 elements of the flattened-mask chunk (64 MiB).
_CHUNK_ELEMS = 2**24


def _as_masks(masks: Tensor | np.ndarray, shape: tuple[int, int]) -> Tensor:
    """``(N, H, W)`` bool tensor (left on its device) after checking its size against ``shape``."""
    m = torch.from_numpy(np.asarray(masks)) if isinstance(masks, np.ndarray) else masks
    if m.ndim != 3 or tuple(m.shape[1:]) != shape:
        raise ValueError(f"masks must be (N, {shape[0]}, {shape[1]}), got {tuple(m.shape)}")
    return m.bool()


def _check_probs(probs: Tensor) -> None:
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"probs must be (C, H, W) with C >= 1, got {tuple(probs.shape)}")


def _rows_per_chunk(pixels: int, chunk_elems: int) -> int:
    return max(1, int(chunk_elems) // max(1, pixels))


def mask_class_scores(
    probs: Tensor, masks: Tensor | np.ndarray, *, chunk_elems: int = _CHUNK_ELEMS
) -> Tensor:
    """Mean class probability inside each mask.

    Args:
        probs: ``(C, H, W)`` float class probabilities in ``[0, 1]`` on original pixels.
        masks: ``(N, H, W)`` bool masks (tensor on any device, or numpy array).
        chunk_elems: float elements of flattened masks held at once (memory bound;
            results do not depend on it beyond float rounding).

    Returns:
        float32 ``(N, C)`` on ``probs.device``: row ``n`` is the mean of ``probs``
        over the pixels of mask ``n`` (so in ``[0, 1]``, summing to 1 when the
        probabilities do); an empty mask gives a row of zeros.
    """
    _check_probs(probs)
    c, h, w = probs.shape
    m = _as_masks(masks, (h, w))
    n, hw = m.shape[0], h * w
    flat_p = probs.reshape(c, hw).float()
    out = torch.zeros((n, c), dtype=torch.float32, device=probs.device)
    step = _rows_per_chunk(hw, chunk_elems)
    for i in range(0, n, step):
        # Move the bool chunk first (1 byte/pixel over the bus), then expand to float.
        chunk = m[i : i + step].reshape(-1, hw).to(probs.device)
        sums = chunk.float() @ flat_p.T  # (k, C) per-class sums inside each mask
        # Integer pixel counts: exact at any size, unlike a float32 row sum above 2**24.
        area = chunk.sum(dim=1, dtype=torch.int64)
        out[i : i + chunk.shape[0]] = sums / area.clamp_min(1)[:, None]  # empty: 0 / 1 = 0
    return out


def recognise_masks(
    probs: Tensor, masks: Tensor | np.ndarray, min_score: float = 0.0, *, chunk_elems: int = _CHUNK_ELEMS
) -> tuple[Tensor, Tensor]:
    """Class of each mask: the argmax of its pooled probabilities, and that pooled probability.

    Args:
        probs: ``(C, H, W)`` float class probabilities in ``[0, 1]``, original pixels.
        masks: ``(N, H, W)`` bool masks.
        min_score: masks whose best pooled probability is below this get class -1.

    Returns:
        ``(class_ids, scores)`` on ``probs.device``: int64 ``(N,)`` class index in
        ``[0, C)``, or -1 for an empty mask or one scoring below ``min_score``;
        float32 ``(N,)`` the best pooled probability in ``[0, 1]`` (0 for an empty
        mask), reported even when the class is -1. Ties go to the lowest class index.
    """
    pooled = mask_class_scores(probs, masks, chunk_elems=chunk_elems)
    scores, class_ids = pooled.max(dim=1)  # (0, C) -> two empty tensors
    # Recompute emptiness rather than trusting an all-zero row: a non-empty mask
    # over pixels with zero probability everywhere is not the same thing.
    empty = ~_as_masks(masks, tuple(probs.shape[1:])).flatten(1).any(dim=1).to(probs.device)
    class_ids = torch.where(empty | (scores < min_score), torch.full_like(class_ids, -1), class_ids)
    return class_ids, scores


def majority_classes(labels: Tensor | np.ndarray, masks: Tensor | np.ndarray, num_classes: int) -> tuple[Tensor, Tensor]:
    """CorrCLIP's region correction: each mask takes the most frequent label inside it.

    Args:
        labels: ``(H, W)`` integer per-pixel class ids in ``[0, num_classes)``, or
            negative for unlabelled pixels (which do not vote).
        masks: ``(N, H, W)`` bool masks.

    Returns:
        ``(class_ids, shares)``: int64 ``(N,)`` the majority class (ties to the lowest
        id; -1 when no labelled pixel is inside), float32 ``(N,)`` the fraction of the
        mask's labelled pixels that voted for it, in ``[0, 1]``.
    """
    lab = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels).long()
    m = _as_masks(masks, tuple(lab.shape))
    n = m.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    flat = lab.reshape(-1).to(m.device)
    voting = flat >= 0
    onehot = torch.zeros((flat.shape[0], num_classes), dtype=torch.float32, device=m.device)
    onehot[voting, flat[voting]] = 1.0
    counts = torch.zeros((n, num_classes), dtype=torch.float32, device=m.device)
    step = _rows_per_chunk(flat.shape[0], _CHUNK_ELEMS)
    for i in range(0, n, step):
        counts[i : i + step] = m[i : i + step].reshape(-1, flat.shape[0]).float() @ onehot
    best, class_ids = counts.max(dim=1)
    total = counts.sum(dim=1)
    class_ids = torch.where(total > 0, class_ids, torch.full_like(class_ids, -1))
    return class_ids, best / total.clamp_min(1)


def _priority(mask_scores: Tensor, areas: Tensor) -> Tensor:
    """Rank of each mask in the overlap rule: ``(N,)`` int64, ``N - 1`` = wins everywhere it covers.

    Higher ``mask_scores`` wins; equal scores: the smaller mask wins; then the
    lower index. NaN scores rank below every number.
    """
    n = mask_scores.shape[0]
    score = torch.nan_to_num(mask_scores.double().cpu(), nan=-np.inf).numpy()
    area = areas.cpu().numpy()
    idx = np.arange(n)
    # lexsort sorts by its last key first, ascending: lowest priority first.
    order = np.lexsort((-idx, -area, score))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = idx
    return torch.from_numpy(rank)


def refine_semantic(
    probs: Tensor,
    masks: Tensor | np.ndarray,
    mask_scores: Tensor | np.ndarray,
    *,
    class_ids: Tensor | np.ndarray | None = None,
    chunk_elems: int = _CHUNK_ELEMS,
) -> Tensor:
    """Semantic label map where each SAM mask votes its region's class.

    Rule, per pixel:

    * covered by at least one mask: the class of the covering mask that wins the
      overlap rule, where a mask's class is the argmax of its pooled class
      probabilities (``recognise_masks``, without a minimum score);
    * covered by none: the per-pixel argmax of ``probs`` (MaskCLIP's own label).

    Overlap rule: the mask with the higher ``mask_scores`` wins; at equal scores
    the smaller mask (fewer pixels) wins, so a part keeps its own label inside a
    whole of the same score; then the lower index. Pass SAM's predicted IoU for
    "the more confident mask wins", the recognition score for "the more certain
    class wins", or ``-area`` for "the smaller mask always wins".

    Args:
        probs: ``(C, H, W)`` float class probabilities in ``[0, 1]``, original pixels.
        masks: ``(N, H, W)`` bool masks (may overlap; may be empty).
        mask_scores: ``(N,)`` float priority of each mask (NaN = lowest).
        class_ids: ``(N,)`` the class each mask paints (e.g. :func:`majority_classes`);
            default: :func:`recognise_masks` on ``probs``. A mask with class -1
            paints nothing (its pixels keep the lower-ranked or MaskCLIP label).
        chunk_elems: elements of the mask chunk held at once (memory bound only).

    Returns:
        int64 ``(H, W)`` class ids in ``[0, C)`` on ``probs.device``.
    """
    _check_probs(probs)
    c, h, w = probs.shape
    m = _as_masks(masks, (h, w))
    n, hw = m.shape[0], h * w
    scores_t = torch.as_tensor(mask_scores)
    if scores_t.shape != (n,):
        raise ValueError(f"mask_scores must be ({n},), got {tuple(scores_t.shape)}")
    labels = probs.argmax(dim=0).to(torch.int64)  # uncovered pixels keep MaskCLIP's label
    if n == 0:
        return labels

    if class_ids is None:
        # min_score=-inf: only empty masks get -1, and those cover no pixel.
        class_ids, _ = recognise_masks(probs, m, -float("inf"), chunk_elems=chunk_elems)
    else:
        class_ids = torch.as_tensor(np.asarray(class_ids) if isinstance(class_ids, np.ndarray) else class_ids)
        if class_ids.shape != (n,):
            raise ValueError(f"class_ids must be ({n},), got {tuple(class_ids.shape)}")
        keep = class_ids >= 0  # a mask without a class does not take part in the vote
        m, scores_t, class_ids = m[keep.to(m.device)], scores_t[keep], class_ids[keep]
        n = m.shape[0]
        if n == 0:
            return labels
    class_ids = class_ids.to(device=probs.device, dtype=torch.int64)
    areas = m.flatten(1).sum(dim=1, dtype=torch.int64)
    rank = _priority(scores_t, areas).to(probs.device)

    # Winner per pixel = the covering mask of highest rank, as (rank + 1), 0 = uncovered.
    # A running max over chunks keeps memory at one (k, H*W) int32 block.
    winner = torch.zeros(hw, dtype=torch.int32, device=probs.device)
    step = _rows_per_chunk(hw, chunk_elems)
    for i in range(0, n, step):
        chunk = m[i : i + step].reshape(-1, hw).to(probs.device)
        votes = torch.where(chunk, (rank[i : i + step] + 1).to(torch.int32)[:, None], 0)
        winner = torch.maximum(winner, votes.amax(dim=0))
    # Class of the mask holding each rank; index 0 (uncovered) is never read.
    class_of_rank = torch.empty(n + 1, dtype=torch.int64, device=probs.device)
    class_of_rank[rank + 1] = class_ids
    covered = winner > 0
    flat = labels.reshape(hw)
    flat[covered] = class_of_rank[winner[covered].long()]
    return flat.reshape(h, w)
