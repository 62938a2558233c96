"""SAM "everything mode" mask proposals decoded from a stored image embedding.

The ``embed`` stage stores SAM's image embedding once per image; this module runs
only the light prompt encoder and mask decoder on it, prompting with a regular grid
of points, and returns class-agnostic masks in original pixels.

It reproduces ``segment_anything.SamAutomaticMaskGenerator`` with
``crop_n_layers=0`` and ``output_mode="binary_mask"`` step for step:

1. Points: a ``points_per_side x points_per_side`` grid of cell centres over the
   *original* image, mapped into the model's input frame with
   ``ResizeLongestSide.apply_coords`` (same float64 arithmetic, so the same prompts).
2. Decoder: points go through the prompt encoder and mask decoder
   ``points_per_batch`` at a time, with ``multimask_output=True`` (3 masks per point).
3. Filters: predicted IoU ``> pred_iou_thresh`` (skipped when the threshold is
   ``<= 0``, as SAM does), then stability score ``>= stability_score_thresh``
   (skipped when ``<= 0``). The stability score is computed on the mask logits
   upscaled to original pixels with ``sam.postprocess_masks``, exactly as SAM does.
4. Box NMS on the boxes of the thresholded masks, scored by predicted IoU:
   ``nms="torchvision"`` is SAM's own ``batched_nms`` (classic greedy NMS, results
   equal SAM's); ``nms="fast"`` is our Fast NMS (YOLACT), which keeps a subset of
   what classic NMS keeps (see ``batchseg.labels.nms``). Then (not in SAM; off with
   ``mask_nms_thresh=None``) Fast NMS on the low-resolution masks themselves, which
   removes duplicates whose boxes disagree because of stray pixels.

Where we differ from SAM, only in how memory is spent (never in results):

* The predicted-IoU filter runs on the low-resolution decoder output, before any
  upscaling (it only looks at one number per mask), so rejected masks are never
  upscaled.
* Upscaling is done in chunks bounded by ``max_chunk_elems`` float elements, and
  only two small things per surviving mask are kept between the filtering pass and
  NMS: its low-resolution logits ``(h_lr, w_lr)`` (``4 * S/4 * S/4`` bytes: 256 KiB
  at SAM's 1024 canvas) and its box. After NMS the kept masks are upscaled a second
  time (the same deterministic op on the same input, so the same bits) and
  thresholded straight into the boolean output. SAM instead keeps every surviving
  mask as an RLE at original resolution.
* Worst case (all filters off) the low-resolution logits of all
  ``3 * points_per_side**2`` candidates sit on the device at once: 3072 x 256 KiB
  = 768 MiB for the defaults at SAM's canvas; with SAM's default thresholds it is
  usually a few hundred.

Not supported: crop layers (``crop_n_layers > 0``; each crop would need its own
image embedding, which the store does not hold) and SAM's small-region
post-processing (``min_mask_region_area > 0``, which needs OpenCV; batchseg does
not depend on it). ``ProposalSettings`` rejects a non-zero ``min_mask_region_area``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import Tensor
from torchvision.ops import batched_nms

from batchseg.io.geometry import letterbox
from batchseg.labels.nms import fast_nms_boxes, fast_nms_masks
from batchseg.labels.settings import MAX_POINTS_PER_SIDE, NmsKind, ProposalSettings  # noqa: F401  (torch-free home; re-exported)

__all__ = ["ProposalSettings", "Proposals", "generate_proposals", "point_grid"]

# Upscaling chunk budget in float32 elements (128 MiB). Each mask being upscaled
# needs S*S (input canvas) + H*W (original) floats at once.
_DEFAULT_CHUNK_ELEMS = 2**25


@dataclass
class Proposals:
    """Class-agnostic mask proposals for one image, in original pixels, best first.

    Rows are in descending predicted-IoU order (NMS output order).

    Attributes:
        masks: ``(N, H, W)`` bool.
        scores: ``(N,)`` float32 predicted IoU (SAM's mask-quality head; roughly
            ``[0, 1]`` for trained models, unbounded in principle).
        stability: ``(N,)`` float32 stability score in ``[0, 1]`` (NaN for a mask
            that is empty even at the low cutoff, which only survives when the
            stability filter is off, as in SAM).
        boxes_xyxy: ``(N, 4)`` float32 ``x1, y1, x2, y2`` in SAM's convention:
            *inclusive* pixel indices of the first/last foreground column and row
            (a one-pixel mask at row 2, col 3 is ``(3, 2, 3, 2)``); an empty mask
            gives ``(0, 0, 0, 0)``. This is the box NMS saw.
        points: ``(N, 2)`` float32 ``x, y`` of the prompting point, original pixels.
    """

    masks: np.ndarray
    scores: np.ndarray
    stability: np.ndarray
    boxes_xyxy: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def point_grid(points_per_side: int, height: int, width: int) -> np.ndarray:
    """The prompt grid in original pixels: ``(n*n, 2)`` float64 ``x, y``, row by row.

    Cell centres of an ``n x n`` grid over ``[0, 1]^2`` (SAM's ``build_point_grid``:
    ``linspace(1/2n, 1 - 1/2n, n)``), scaled by ``(width, height)``. Same values and
    order as SAM's ``points_for_image``, x varying fastest.
    """
    n = points_per_side
    offset = 1 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    xs = np.tile(side[None, :], (n, 1))
    ys = np.tile(side[:, None], (1, n))
    unit = np.stack([xs, ys], axis=-1).reshape(-1, 2)
    return unit * np.array([[width, height]], dtype=np.float64)


def _to_input_frame(
    points: np.ndarray, original: tuple[int, int], resized: tuple[int, int]
) -> np.ndarray:
    """``ResizeLongestSide.apply_coords``: original pixels -> resized-image pixels (float64).

    Written as SAM writes it (python-float ratio times a float64 array) so the
    prompts, and therefore the masks, are bit-for-bit SAM's.
    """
    (old_h, old_w), (new_h, new_w) = original, resized
    out = points.astype(np.float64, copy=True)
    out[..., 0] = out[..., 0] * (new_w / old_w)
    out[..., 1] = out[..., 1] * (new_h / old_h)
    return out


def _mask_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of ``(n, H, W)`` bool masks: ``(n, 4)`` int64 inclusive xyxy, empty -> 0s.

    Same values as SAM's ``batched_mask_to_box``, via first/last True of the
    row and column projections.
    """
    n, h, w = masks.shape
    rows = masks.any(dim=2)  # (n, H): row holds foreground
    cols = masks.any(dim=1)  # (n, W)
    # argmax of a bool (as uint8) returns the first maximal index: the first True.
    y1 = rows.to(torch.uint8).argmax(dim=1)
    y2 = (h - 1) - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x1 = cols.to(torch.uint8).argmax(dim=1)
    x2 = (w - 1) - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.int64)
    return boxes * rows.any(dim=1, keepdim=True)  # empty mask -> (0, 0, 0, 0)


def _stability(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """SAM's stability score of ``(n, H, W)`` logits: ``(n,)`` float32 in ``[0, 1]`` (NaN if 0/0).

    The high-cutoff mask is always inside the low-cutoff one, so the ratio of
    their areas is their IoU. Integer counts, then integer true division, as SAM.
    """
    inter = (logits > (threshold + offset)).sum(dim=(-2, -1), dtype=torch.int64).to(torch.int32)
    union = (logits > (threshold - offset)).sum(dim=(-2, -1), dtype=torch.int64).to(torch.int32)
    return (inter / union).to(torch.float32)


def _chunk_size(sam: Sam, original_size: tuple[int, int], max_chunk_elems: int) -> int:
    """Masks per upscaling chunk so one chunk's float tensors stay within ``max_chunk_elems``."""
    canvas = int(sam.image_encoder.img_size)
    per_mask = canvas * canvas + original_size[0] * original_size[1]
    return max(1, int(max_chunk_elems) // per_mask)


def _upscale(
    sam: Sam, low_res: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> Tensor:
    """``(n, h_lr, w_lr)`` logits -> ``(n, H, W)`` float logits, original pixels (``sam.postprocess_masks``)."""
    return sam.postprocess_masks(low_res[:, None], input_size, original_size)[:, 0]


@torch.inference_mode()
def generate_proposals(
    sam: Sam,
    embedding: Tensor | np.ndarray,
    original_size: tuple[int, int],
    settings: ProposalSettings = ProposalSettings(),
    *,
    input_size: tuple[int, int] | None = None,
    max_chunk_elems: int = _DEFAULT_CHUNK_ELEMS,
) -> Proposals:
    """Everything-mode proposals from one stored SAM image embedding.

    Runs on the device of ``sam``'s mask decoder (the model is never moved); the
    embedding is moved there and cast to the decoder's dtype (stored embeddings
    are fp16, the decoder float32). Nothing calls the image encoder.

    Args:
        sam: a ``segment_anything`` ``Sam`` (only ``prompt_encoder``,
            ``mask_decoder``, ``postprocess_masks``, ``mask_threshold`` and
            ``image_encoder.img_size`` are used).
        embedding: ``(C, h, w)`` image embedding of the letterboxed image, any
            float dtype, e.g. ``(256, 64, 64)`` for vit_b/h, ``(32, 16, 16)`` for tiny.
        original_size: ``(H, W)`` the masks are made at: the original image, or a
            smaller work frame of it (``pseudolabel --work-max-side``).
        settings: see ``ProposalSettings``.
        input_size: ``(h, w)`` of the image's valid region on SAM's canvas as the
            embedding was computed (the manifest's ``sam_valid_h``/``sam_valid_w``).
            Pass it whenever ``original_size`` is not the size the image was embedded
            at: recomputed from a work frame it can be one pixel off. Default: the
            letterbox of ``original_size`` (SamPredictor's ``input_size``).
        max_chunk_elems: float elements one upscaling chunk may hold (memory bound;
            results do not depend on it).

    Returns:
        ``Proposals`` with ``N`` masks (possibly 0), best predicted IoU first.
    """
    height, width = (int(v) for v in original_size)
    param = next(sam.mask_decoder.parameters())
    device, dtype = param.device, param.dtype
    emb = torch.as_tensor(embedding)
    pe = sam.prompt_encoder
    expected = (int(pe.embed_dim), *map(int, pe.image_embedding_size))
    if tuple(emb.shape) != expected:
        raise ValueError(
            f"embedding must have shape (C, h, w) = {expected} for this model, got {tuple(emb.shape)}"
        )
    emb = emb.to(device=device, dtype=dtype)[None].contiguous()  # (1, C, h, w)

    canvas = int(sam.image_encoder.img_size)
    if input_size is None:
        box = letterbox(height, width, canvas)  # equals SamPredictor's input_size
        input_size = (box.valid_h, box.valid_w)
    input_size = (int(input_size[0]), int(input_size[1]))
    if not (0 < input_size[0] <= canvas and 0 < input_size[1] <= canvas):
        raise ValueError(f"input_size {input_size} is not a valid region of the {canvas} px SAM canvas")
    grid = point_grid(settings.points_per_side, height, width)  # (P, 2) float64, original px
    prompts = _to_input_frame(grid, (height, width), input_size)
    image_pe = sam.prompt_encoder.get_dense_pe()  # (1, C, h, w); the same for every batch
    threshold = float(sam.mask_threshold)
    chunk = _chunk_size(sam, (height, width), max_chunk_elems)

    # Survivors of the two filters, one list entry per decoder batch.
    kept_low: list[Tensor] = []  # (m, h_lr, w_lr) logits
    kept_iou: list[Tensor] = []
    kept_stab: list[Tensor] = []
    kept_box: list[Tensor] = []
    kept_pt: list[Tensor] = []  # index into grid
    for start in range(0, len(prompts), settings.points_per_batch):
        # float64 coordinates, like SAM's torch.as_tensor of apply_coords' output;
        # the prompt encoder casts to float32 only after normalising them.
        coords = torch.as_tensor(prompts[start : start + settings.points_per_batch], device=device)
        b = coords.shape[0]
        labels = torch.ones((b, 1), dtype=torch.int, device=device)  # 1 = foreground
        sparse, dense = sam.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=emb,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )  # (b, 3, h_lr, w_lr), (b, 3)
        k = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        pt = torch.arange(start, start + b, device=device).repeat_interleave(k)

        # Predicted IoU is one number per mask: filter before paying for upscaling.
        if settings.pred_iou_thresh > 0.0:
            keep = iou > settings.pred_iou_thresh
            low_res, iou, pt = low_res[keep], iou[keep], pt[keep]

        # Stability and boxes need original-resolution logits; upscale in chunks
        # and keep only per-mask numbers, never the big tensors.
        stab_parts, box_parts = [], []
        for i in range(0, low_res.shape[0], chunk):
            logits = _upscale(sam, low_res[i : i + chunk], input_size, (height, width))
            stab_parts.append(_stability(logits, threshold, settings.stability_score_offset))
            box_parts.append(_mask_boxes(logits > threshold))
            del logits
        if stab_parts:
            stab, boxes = torch.cat(stab_parts), torch.cat(box_parts)
        else:  # every mask of this batch failed the IoU filter
            stab = iou.new_empty(0)
            boxes = torch.zeros((0, 4), dtype=torch.int64, device=device)
        if settings.stability_score_thresh > 0.0:
            keep = stab >= settings.stability_score_thresh  # NaN (0/0) fails, as in SAM
            low_res, iou, pt, stab, boxes = low_res[keep], iou[keep], pt[keep], stab[keep], boxes[keep]
        kept_low.append(low_res)
        kept_iou.append(iou)
        kept_stab.append(stab)
        kept_box.append(boxes)
        kept_pt.append(pt)

    low_res = torch.cat(kept_low)
    iou = torch.cat(kept_iou).float()
    stab = torch.cat(kept_stab)
    boxes = torch.cat(kept_box).float()
    pt = torch.cat(kept_pt)
    del kept_low

    if boxes.shape[0] == 0:
        order = torch.empty(0, dtype=torch.int64, device=device)
    elif settings.nms == "torchvision":
        # SAM's call: one category, scores = predicted IoU.
        cats = torch.zeros(boxes.shape[0], dtype=torch.int64, device=device)
        order = batched_nms(boxes, iou, cats, iou_threshold=settings.box_nms_thresh)
    else:
        order = fast_nms_boxes(boxes, iou, settings.box_nms_thresh)
    if settings.mask_nms_thresh is not None and order.numel() > 1:
        # Low-resolution masks are enough to see duplicates and cost (N, 256, 256) bools at most.
        kept = fast_nms_masks(low_res[order] > threshold, iou[order], settings.mask_nms_thresh)
        order = order[kept]

    # Second upscaling, only for the kept masks, thresholded straight into the output.
    masks = np.zeros((order.numel(), height, width), dtype=bool)
    for i in range(0, order.numel(), chunk):
        logits = _upscale(sam, low_res[order[i : i + chunk]], input_size, (height, width))
        masks[i : i + logits.shape[0]] = (logits > threshold).cpu().numpy()
        del logits
    points = torch.as_tensor(grid, dtype=torch.float32)[pt[order].cpu()]
    return Proposals(
        masks=masks,
        scores=iou[order].cpu().numpy().astype(np.float32),
        stability=stab[order].float().cpu().numpy(),
        boxes_xyxy=boxes[order].cpu().numpy().astype(np.float32),
        points=points.numpy().reshape(-1, 2),
    )
