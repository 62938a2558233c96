"""Train the toy SAM that batchseg ships: segment-anything's own ``Sam`` at the ``tiny`` sizes.

The model is ``batchseg.models.sam.build_sam_model(SAM_ARCHS["tiny"])`` (256 px
canvas, 16 px patches, a (32, 16, 16) image embedding), trained from scratch on
the synthetic world (``batchseg.world``) with point and box prompts against the
world's visible instance masks, the way SAM is trained:

* inputs are exactly what the pipeline feeds it (``SamEncoder.preprocess``:
  SAM's resize-longest-side, normalisation and padding); prompts are mapped to the
  resized frame as ``ResizeLongestSide.apply_coords`` does;
* each step encodes a batch of images once, then decodes several prompts per
  image (a random point inside a random object, sometimes that object's box with
  jitter, sometimes a point on the background whose target is the empty mask);
* single points use the multimask output (3 masks) and only the lowest-loss mask
  gets the mask loss; boxes use the single-mask output;
* mask loss = 20 * focal + dice (SAM's 20:1) + an edge-margin hinge, all at
  *original* pixels: the low-resolution logits are read (bilinearly, as
  ``Sam.postprocess_masks`` upsamples them) at pixel centres sampled by stratum
  (inside the object, a 2 px band around its edge, outside) and weighted by
  stratum area, which estimates the full-image sums without upsampling every
  mask (upsampling made the loss 5x the cost of the model). The hinge
  ``relu(m - y * logit)`` on the edge band, with ``m`` ramping from 2 to 6 over the middle half of training, makes
  edges steep: everything mode keeps a mask only if its stability score (the
  masks at logit > -1 and > +1 agree) is >= 0.95, and focal + dice alone leave
  edges too soft for that (measured: stability ~0.55 on good masks after 1000 steps);
* the IoU head is trained with MSE (weight 4; SAM uses 1) against the actual IoU
  of *every* output mask (not only the chosen one), because everything mode
  keeps or drops all three masks of each grid point by their predicted IoU.

Data is a pure function of ``--seed`` and the step (world ``seed``, fresh samples
every step), the model init of ``--seed``: with ``--steps`` and the same
``--threads`` a run is bit-reproducible on one machine. ``--minutes`` measures
the speed during the warmup, then fixes the number of steps that fits the
budget (evaluations included) and prints it; ``--steps N`` with that number
reproduces the run.

Evaluation (held-out world seed ``--eval-seed``, never used for training) at
step 0 (random init), every ``--eval-every`` steps and at the end:

* point: one random point inside each ground-truth object, 3 masks; IoU at
  original resolution (``Sam.postprocess_masks``) of the mask with the highest
  predicted IoU (what ``SamPredictor`` users pick) and of the best of the three;
* box: the object's tight box, single mask;
* IoU head: mean absolute error of the predicted vs actual IoU of all point masks;
* everything mode: ``batchseg.labels.proposals.generate_proposals`` with its
  defaults (32x32 points, pred_iou_thresh 0.88, stability 0.95) on the fp16
  embedding the ``embed`` stage stores; masks kept per image, recall of the
  ground-truth instances at IoU 0.5, mean best-match IoU per instance, and the
  share of kept masks that match an instance at IoU 0.5 (precision).

Writes the checkpoint (``save_sam_checkpoint``: safetensors, float32), checks it
loads through ``load_sam(SamSpec("tiny", path))`` (the same path as
``batchseg embed --sam-model tiny --sam-checkpoint FILE``), and writes a model
card (``FILE`` with suffix ``.md``) and the metrics (suffix ``.metrics.json``).

Usage::

    python examples/train_toy_sam.py                # 25 minutes on 2 threads -> batchseg/assets/toy-sam.*
    python examples/train_toy_sam.py --steps 12000 --threads 2 --out /tmp/toy-sam.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor

from batchseg.io.geometry import letterbox
from batchseg.io.hashing import file_sha256
from batchseg.labels.proposals import ProposalSettings, generate_proposals
from batchseg.models.sam import SAM_ARCHS, SamEncoder, SamSpec, build_sam_model, load_sam, save_sam_checkpoint
from batchseg.world import render_sample

ARCH_NAME = "tiny"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "batchseg" / "assets" / "toy-sam.safetensors"
FOCAL_WEIGHT = 20.0  # SAM: focal and dice in a 20:1 ratio


@dataclass
class TrainConfig:
    """Everything that determines a run (written into the metrics and the model card)."""

    out: str = str(DEFAULT_OUT)
    steps: int | None = None  # None: train for ``minutes``
    minutes: float = 25.0
    threads: int = 2
    seed: int = 0  # model init, prompt sampling, and the training world's seed
    batch_images: int = 8
    points_per_image: int = 4  # objects (without replacement) prompted with one point each
    box_prob: float = 0.5  # chance that a prompted object also gets a box prompt
    bg_prob: float = 0.5  # chance that an image also gets one background point (target: empty)
    box_jitter: float = 0.07  # box corner noise std, as a fraction of the box side
    loss_points: tuple[int, int, int] = (128, 128, 256)  # per prompt: inside, edge band, outside
    edge_weight: float = 1.0  # weight of the edge-margin term (see mask_losses)
    edge_margin_start: float = 2.0  # logit margin the edge-band pixels are pushed beyond, ramping
    edge_margin: float = 6.0  # ... linearly from edge_margin_start to this over training
    iou_weight: float = 4.0  # weight of the IoU-head MSE (SAM: 1)
    lr: float = 1e-2
    min_lr_frac: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_seed: int = 999
    eval_images: int = 100
    eval_everything_images: int = 25
    eval_every: int = 3000  # steps; 0: only at step 0 and the end
    log_every: int = 50
    write_card: bool = True
    init_from: str | None = None  # start from these weights instead of random init (fine-tuning)


# --------------------------------------------------------------------------- data


@dataclass
class Prepared:
    """One world sample in the model's frame, with what the loss samples from."""

    pixels: Tensor  # (3, S, S) float32, SamEncoder.preprocess
    masks: list[np.ndarray]  # n x (H, W) bool, original pixels
    boxes: np.ndarray  # (n, 4) float64 x1 y1 x2 y2, original pixels (exclusive right/bottom)
    background: np.ndarray  # flat indices of background pixels
    strata: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per object: flat indices inner, band, outer
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a ``(2r+1)`` square (separable max over shifts)."""
    out = mask.copy()
    for axis in (0, 1):
        src, n = out.copy(), out.shape[axis]
        for d in range(1, r + 1):
            if d >= n:
                break
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - d), slice(d, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def prepare(encoder: SamEncoder, seed: int, index: int, band: int = 2) -> Prepared:
    """Render world sample ``index`` of ``seed`` and prepare it for training or evaluation.

    Each object's pixels are split into three strata for the point-sampled loss:
    the band of pixels within ``band`` px of its edge (both sides), the object's
    inside without the band, and everything else.
    """
    s = render_sample(seed, index)
    h, w = s.image.shape[:2]
    box = letterbox(h, w, encoder.image_size)
    boxes = np.zeros((len(s.objects), 4), dtype=np.float64)
    strata = []
    for j, o in enumerate(s.objects):
        x, y, bw, bh = o.bbox_xywh
        boxes[j] = (x, y, x + bw, y + bh)
        edge = _dilate(o.mask, band) & _dilate(~o.mask, band)
        strata.append((
            np.flatnonzero((o.mask & ~edge).ravel()),
            np.flatnonzero(edge.ravel()),
            np.flatnonzero((~o.mask & ~edge).ravel()),
        ))
    return Prepared(
        pixels=encoder.preprocess(s.image),
        masks=[o.mask for o in s.objects],
        boxes=boxes,
        background=np.flatnonzero(s.semantic.ravel() == 0),
        strata=strata,
        original_size=(h, w),
        input_size=(box.valid_h, box.valid_w),
    )


def to_input_frame(xy: np.ndarray, original: tuple[int, int], resized: tuple[int, int]) -> np.ndarray:
    """``ResizeLongestSide.apply_coords`` (``x`` by width ratio, ``y`` by height ratio)."""
    out = np.array(xy, dtype=np.float64, copy=True)
    out[..., 0] *= resized[1] / original[1]
    out[..., 1] *= resized[0] / original[0]
    return out


def random_point(rng: np.random.Generator, flat: np.ndarray, width: int) -> tuple[float, float]:
    """A continuous point inside a random pixel of ``flat`` (flat indices), original pixels."""
    i = int(flat[rng.integers(len(flat))])
    y, x = divmod(i, width)
    return x + float(rng.random()), y + float(rng.random())


@dataclass
class Prompts:
    """The prompts of one step, in the resized frame, grouped by kind."""

    point_image: list[int] = field(default_factory=list)
    point_xy: list[tuple[float, float]] = field(default_factory=list)
    point_target: list[int] = field(default_factory=list)  # object index, -1 = empty mask
    box_image: list[int] = field(default_factory=list)
    box_xyxy: list[list[float]] = field(default_factory=list)
    box_target: list[int] = field(default_factory=list)


def sample_prompts(rng: np.random.Generator, batch: list[Prepared], cfg: TrainConfig) -> Prompts:
    p = Prompts()
    for i, item in enumerate(batch):
        h, w = item.original_size
        n = len(item.masks)
        for j in rng.permutation(n)[: cfg.points_per_image]:
            j = int(j)
            xy = random_point(rng, np.flatnonzero(item.masks[j].ravel()), w)
            p.point_image.append(i)
            p.point_xy.append(tuple(to_input_frame(np.array(xy), item.original_size, item.input_size)))
            p.point_target.append(j)
            if rng.random() < cfg.box_prob:
                x1, y1, x2, y2 = item.boxes[j]
                sides = np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
                noisy = item.boxes[j] + rng.normal(size=4) * cfg.box_jitter * sides
                noisy = np.clip(noisy, 0, [w, h, w, h])
                if noisy[2] - noisy[0] < 1 or noisy[3] - noisy[1] < 1:
                    noisy = item.boxes[j]
                p.box_image.append(i)
                p.box_xyxy.append(list(to_input_frame(noisy.reshape(2, 2), item.original_size, item.input_size).ravel()))
                p.box_target.append(j)
        if len(item.background) and rng.random() < cfg.bg_prob:
            xy = random_point(rng, item.background, w)
            p.point_image.append(i)
            p.point_xy.append(tuple(to_input_frame(np.array(xy), item.original_size, item.input_size)))
            p.point_target.append(-1)
    return p


# --------------------------------------------------------------------------- model


def decode_batched(sam: Sam, embeddings: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
    """``MaskDecoder.predict_masks`` with one image embedding *per prompt* (all 4 mask tokens).

    segment-anything's decoder repeats one image's embedding for every prompt; here
    ``embeddings`` is ``(N, C, h, w)`` already (row ``i`` is prompt ``i``'s image),
    so prompts of many images go through one call. Same layers, same arithmetic
    (the test checks it against ``sam.mask_decoder`` on one image).

    Returns ``(N, 4, 4h, 4w)`` low-resolution logits and ``(N, 4)`` predicted IoUs;
    index 0 is the single-mask output, 1..3 the multimask outputs.
    """
    dec = sam.mask_decoder
    n = sparse.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    src = embeddings + dense
    pos_src = sam.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = dec.output_upscaling(src)
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, dec.iou_prediction_head(iou_token_out)


def run_prompts(sam: Sam, embeddings: Tensor, prompts: Prompts) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Decode a step's prompts. Returns point logits ``(Np, 3, ...)``/IoUs ``(Np, 3)`` and box ``(Nb, 1, ...)``/``(Nb, 1)``."""
    pe = sam.prompt_encoder
    sparse_parts, image_index = [], []
    if prompts.point_image:
        coords = torch.tensor(prompts.point_xy, dtype=torch.float32)[:, None, :]
        labels = torch.ones((len(prompts.point_image), 1), dtype=torch.int)
        sparse_parts.append(pe(points=(coords, labels), boxes=None, masks=None)[0])  # point + padding point
        image_index += prompts.point_image
    if prompts.box_image:
        boxes = torch.tensor(prompts.box_xyxy, dtype=torch.float32)
        sparse_parts.append(pe(points=None, boxes=boxes, masks=None)[0])  # two corners
        image_index += prompts.box_image
    if not sparse_parts:
        return None, None, None, None
    sparse = torch.cat(sparse_parts)  # both kinds have 2 sparse tokens
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
    emb = embeddings[torch.tensor(image_index)]
    logits, iou = decode_batched(sam, emb, sparse, dense)
    n_pt = len(prompts.point_image)
    return logits[:n_pt, 1:], iou[:n_pt, 1:], logits[n_pt:, :1], iou[n_pt:, :1]


@dataclass
class LossPoints:
    """Where the loss looks at each prompt's masks: original pixels, sampled by stratum.

    ``grid``: ``(N, P, 1, 2)`` ``grid_sample`` coordinates of the pixel centres on the
    low-resolution logit grid; ``target``: ``(N, P)`` 0/1; ``weight``: ``(N, P)``
    pixel area each point stands for (sums to the image area); ``area``: ``(N,)``
    ground-truth area in pixels (0 for an empty target).
    """

    grid: Tensor
    target: Tensor
    weight: Tensor
    area: Tensor
    band: Tensor


def sample_loss_points(
    rng: np.random.Generator, batch: list[Prepared], images: list[int], objects: list[int],
    canvas: int, counts: tuple[int, int, int],
) -> LossPoints:
    """Stratified points (inner, edge band, outside) per prompt; unbiased estimates of full-image sums.

    A pixel centre ``(x + 0.5, y + 0.5)`` of an ``H x W`` image lies at canvas
    coordinate ``(x + 0.5) * valid_w / W`` (likewise y), which is where
    ``Sam.postprocess_masks`` reads the upsampled logits for that pixel; on the
    low-resolution grid (``align_corners=False``) that is ``2 * c / S - 1``.
    """
    total = sum(counts)
    grid = np.zeros((len(images), total, 2), dtype=np.float32)
    target = np.zeros((len(images), total), dtype=np.float32)
    weight = np.zeros((len(images), total), dtype=np.float32)
    area = np.zeros(len(images), dtype=np.float32)
    band = np.zeros((len(images), total), dtype=bool)
    for r, (i, j) in enumerate(zip(images, objects)):
        item = batch[i]
        h, w = item.original_size
        if j >= 0:
            parts = item.strata[j]
            area[r] = item.masks[j].sum()
            flat_target = item.masks[j].ravel()
        else:  # empty target: every pixel is "outside"
            parts = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.arange(h * w))
            flat_target = None
        start = 0
        for idx, n in zip(parts, counts):
            if len(idx):
                pick = idx[rng.integers(len(idx), size=n)]
                weight[r, start : start + n] = len(idx) / n
                band[r, start : start + n] = start == counts[0]
            else:  # empty stratum: placeholder points with zero weight
                pick = np.zeros(n, dtype=np.int64)
            y, x = np.divmod(pick, w)
            grid[r, start : start + n, 0] = (x + 0.5) * (item.input_size[1] / w) * (2.0 / canvas) - 1.0
            grid[r, start : start + n, 1] = (y + 0.5) * (item.input_size[0] / h) * (2.0 / canvas) - 1.0
            if flat_target is not None:
                target[r, start : start + n] = flat_target[pick]
            start += n
    return LossPoints(
        grid=torch.from_numpy(grid)[:, :, None, :], target=torch.from_numpy(target),
        weight=torch.from_numpy(weight), area=torch.from_numpy(area), band=torch.from_numpy(band),
    )


def mask_losses(low_res: Tensor, pts: LossPoints, margin: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-mask focal (per-pixel mean), dice, edge margin and hard IoU of ``(N, M, h, w)`` logits at ``pts``.

    The logits are read at the points by bilinear interpolation with border
    clamping: the values the pipeline's upsampling gives those pixels.

    The edge-margin term is the mean hinge ``relu(margin - y * logit)`` (``y = +-1``)
    over the edge-band points. Focal loss stops pushing once a pixel is confidently
    right, so on its own it leaves edges soft; SAM's stability score (everything
    mode keeps a mask only if ``logit > +1`` and ``logit > -1`` give nearly the same
    mask) needs the logits to cross from below -1 to above +1 within a pixel of the edge.
    """
    logits = F.grid_sample(low_res, pts.grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
    t = pts.target[:, None].expand_as(logits)  # (N, M, P)
    wt = pts.weight[:, None]
    image_area = pts.weight.sum(dim=1, keepdim=True)  # (N, 1)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    focal = (wt * alpha_t * ce * (1 - p_t) ** 2).sum(-1) / image_area
    area = pts.area[:, None]
    inter = (wt * prob * t).sum(-1)
    dice = 1 - (2 * inter + 1) / ((wt * prob).sum(-1) + area + 1)
    band = pts.band[:, None].float()
    edge = (band * F.relu(margin - (2 * t - 1) * logits)).sum(-1) / band.sum(-1).clamp(min=1)
    with torch.no_grad():
        hard = (logits > 0).float()
        tp = (wt * hard * t).sum(-1)
        fp = (wt * hard * (1 - t)).sum(-1)
        union = area + fp
        iou = torch.where(area > 0, tp / union.clamp(min=1e-6), torch.zeros_like(union))  # empty target: 0
    return focal, dice, edge, iou


def prompt_losses(
    sam: Sam, batch: list[Prepared], prompts: Prompts, decoded: tuple[Tensor | None, ...],
    rng: np.random.Generator, cfg: TrainConfig, margin: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The training loss of decoded prompts: mean over prompts of mask loss + IoU-head MSE."""
    pt_logits, pt_iou, box_logits, box_iou = decoded
    canvas = int(sam.image_encoder.img_size)
    total = sam.mask_decoder.iou_token.weight.new_zeros(())
    stats: dict[str, float] = {}
    n_prompts = 0
    for name, logits, iou_pred, images, objects in (
        ("point", pt_logits, pt_iou, prompts.point_image, prompts.point_target),
        ("box", box_logits, box_iou, prompts.box_image, prompts.box_target),
    ):
        if logits is None or logits.shape[0] == 0:
            continue
        pts = sample_loss_points(rng, batch, images, objects, canvas, cfg.loss_points)
        focal, dice, edge, iou = mask_losses(logits, pts, cfg.edge_margin if margin is None else margin)
        per_mask = FOCAL_WEIGHT * focal + dice + cfg.edge_weight * edge  # (N, M)
        best = per_mask.detach().argmin(dim=1)  # SAM: only the lowest-loss output learns the mask
        rows = torch.arange(per_mask.shape[0])
        iou_loss = F.mse_loss(iou_pred, iou, reduction="none").mean(dim=1)
        total = total + (per_mask[rows, best] + cfg.iou_weight * iou_loss).sum()
        n_prompts += per_mask.shape[0]
        with torch.no_grad():
            has_object = torch.tensor([j >= 0 for j in objects])
            if has_object.any():
                stats[f"{name}_iou"] = float(iou[rows, best][has_object].mean())
            stats[f"{name}_focal"] = float(focal[rows, best].mean())
            stats[f"{name}_dice"] = float(dice[rows, best].mean())
            stats[f"{name}_edge"] = float(edge[rows, best].mean())
            stats[f"{name}_iou_mae"] = float((iou_pred - iou).abs().mean())
    loss = total / max(1, n_prompts)
    stats["loss"] = float(loss.detach())
    return loss, stats


def step_loss(
    sam: Sam, batch: list[Prepared], prompts: Prompts, rng: np.random.Generator, cfg: TrainConfig,
    margin: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Encode the batch once, decode all its prompts, return the loss."""
    embeddings = sam.image_encoder(torch.stack([b.pixels for b in batch]))
    return prompt_losses(sam, batch, prompts, run_prompts(sam, embeddings, prompts), rng, cfg, margin)


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalSet:
    seed: int
    items: list[Prepared]
    points: list[np.ndarray]  # per image: (n, 2) original-pixel points, one per object


def make_eval_set(encoder: SamEncoder, seed: int, count: int) -> EvalSet:
    rng = np.random.default_rng([seed, 7])
    items, points = [], []
    for index in range(count):
        item = prepare(encoder, seed, index)
        w = item.original_size[1]
        points.append(np.array([random_point(rng, np.flatnonzero(m.ravel()), w) for m in item.masks]))
        items.append(item)
    return EvalSet(seed, items, points)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


@torch.inference_mode()
def evaluate(
    sam: Sam, data: EvalSet, everything_images: int, cfg: TrainConfig = TrainConfig()
) -> dict[str, float]:
    """Prompted IoUs on every eval image, everything mode on the first ``everything_images``."""
    was_training = sam.training
    sam.eval()
    encoder = SamEncoder(sam)
    top, oracle, box_ious, mae, eval_losses = [], [], [], [], []
    kept, recall, best_match, precise, n_gt = [], [], [], [], 0
    settings = ProposalSettings()
    for start in range(0, len(data.items), 16):
        chunk = data.items[start : start + 16]
        embeddings = encoder(torch.stack([b.pixels for b in chunk]))
        for k, item in enumerate(chunk):
            idx = start + k
            n = len(item.masks)
            prompts = Prompts(
                point_image=[k] * n,
                point_xy=[tuple(v) for v in to_input_frame(data.points[idx], item.original_size, item.input_size)],
                point_target=list(range(n)),
                box_image=[k] * n,
                box_xyxy=[list(v) for v in to_input_frame(item.boxes.reshape(-1, 2, 2), item.original_size, item.input_size).reshape(-1, 4)],
                box_target=list(range(n)),
            )
            decoded = run_prompts(sam, embeddings, prompts)
            rng = np.random.default_rng([data.seed, 11, idx])  # the same points at every evaluation
            eval_losses.append(float(prompt_losses(sam, chunk, prompts, decoded, rng, cfg)[0]))
            pt_logits, pt_iou, box_logits, _ = decoded
            pt_masks = sam.postprocess_masks(pt_logits, item.input_size, item.original_size) > sam.mask_threshold
            box_masks = sam.postprocess_masks(box_logits, item.input_size, item.original_size) > sam.mask_threshold
            for j, gt in enumerate(item.masks):
                ious = [_iou(pt_masks[j, m].numpy(), gt) for m in range(3)]
                top.append(ious[int(pt_iou[j].argmax())])
                oracle.append(max(ious))
                mae += [abs(float(pt_iou[j, m]) - ious[m]) for m in range(3)]
                box_ious.append(_iou(box_masks[j, 0].numpy(), gt))
            if idx < everything_images:
                stored = embeddings[k].to(torch.float16)  # what `embed` stores
                props = generate_proposals(sam, stored, item.original_size, settings)
                kept.append(len(props))
                matches = np.array([[_iou(p, gt) for gt in item.masks] for p in props.masks]).reshape(len(props), n)
                per_gt = matches.max(axis=0) if len(props) else np.zeros(n)
                best_match += list(per_gt)
                recall += list(per_gt >= 0.5)
                precise += list(matches.max(axis=1) >= 0.5) if len(props) else []
                n_gt += n
    if was_training:
        sam.train()
    out = {
        "eval_loss": float(np.mean(eval_losses)),
        "point_miou_top": float(np.mean(top)),
        "point_miou_oracle": float(np.mean(oracle)),
        "box_miou": float(np.mean(box_ious)),
        "iou_head_mae": float(np.mean(mae)),
        "instances": len(top),
    }
    if kept:
        out.update({
            "everything_images": len(kept),
            "everything_kept_per_image": float(np.mean(kept)),
            "everything_gt_per_image": n_gt / len(kept),
            "everything_recall50": float(np.mean(recall)),
            "everything_best_match_miou": float(np.mean(best_match)),
            "everything_precision50": float(np.mean(precise)) if precise else 0.0,
        })
    return out


# --------------------------------------------------------------------------- training


def schedule(cfg: TrainConfig, step: int, total: int | None) -> tuple[float, float]:
    """Learning rate and edge margin at ``step`` of ``total``.

    Linear warmup for ``warmup_steps``, then cosine decay to ``min_lr_frac * lr``;
    the edge margin stays at ``edge_margin_start`` for the first quarter after the
    warmup, ramps linearly to ``edge_margin`` over the next half and stays there
    (demanding steep edges early slows learning the shapes).
    Nothing in the warmup depends on ``total``, which ``--minutes`` fixes only
    once the warmup has measured the speed.
    """
    if step < cfg.warmup_steps or total is None:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps), cfg.edge_margin_start
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * progress))
    lr = cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cos)
    ramp = min(1.0, max(0.0, (progress - 0.25) / 0.5))
    return lr, cfg.edge_margin_start + (cfg.edge_margin - cfg.edge_margin_start) * ramp


def train(cfg: TrainConfig, log=print) -> dict[str, Any]:  # noqa: ANN001
    """Train, save, reload-check; returns the metrics dict (also written next to the checkpoint)."""
    if cfg.seed == cfg.eval_seed:
        raise ValueError(f"--seed {cfg.seed} is the held-out evaluation world seed; pick another")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError("--steps must be >= 1")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, log) -> dict[str, Any]:  # noqa: ANN001
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    sam = build_sam_model(SAM_ARCHS[ARCH_NAME])
    if cfg.init_from:
        sam.load_state_dict(load_sam(SamSpec(ARCH_NAME, cfg.init_from)).state_dict())
    sam.train()
    encoder = SamEncoder(sam)
    params = [p for p in sam.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999),
    )
    eval_set = make_eval_set(encoder, cfg.eval_seed, cfg.eval_images)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []

    def run_eval(step: int, elapsed: float) -> None:
        t = time.perf_counter()
        metrics = evaluate(sam, eval_set, cfg.eval_everything_images, cfg)
        metrics.update(step=step, train_seconds=round(elapsed, 1), eval_seconds=round(time.perf_counter() - t, 1))
        evals.append(metrics)
        log("eval " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))

    run_eval(0, 0.0)
    total = cfg.steps  # --minutes: fixed after the warmup from the measured speed
    calibrate_from = min(20, cfg.warmup_steps // 2)  # skip the first steps (allocator warm-up)
    calibrate_t = 0.0
    train_time = 0.0  # seconds spent in training steps (evaluation excluded)
    window: list[dict[str, float]] = []
    step = 0
    while total is None or step < total:
        t0 = time.perf_counter()
        if step == calibrate_from:
            calibrate_t = train_time
        if total is None and step == cfg.warmup_steps:
            per_step = (train_time - calibrate_t) / max(1, step - calibrate_from)
            remaining = cfg.minutes * 60.0 - (time.perf_counter() - started)
            # Reserve time for the periodic evaluations and the final one. Later ones
            # cost more than the first (everything mode then keeps and upsamples
            # masks; measured about 3x), so reserve 3x the first's time for each.
            eval_cost = 3.0 * evals[0]["eval_seconds"]
            remaining -= eval_cost
            n = int(remaining / (per_step + (eval_cost / cfg.eval_every if cfg.eval_every else 0.0)))
            total = max(step + 1, step + n)
            log(f"measured {per_step:.3f} s/step: training {total} steps in all "
                f"(rerun with --steps {total} --threads {cfg.threads} to reproduce this run exactly)")
        lr, margin = schedule(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng([cfg.seed, step])
        batch = [prepare(encoder, cfg.seed, step * cfg.batch_images + i) for i in range(cfg.batch_images)]
        prompts = sample_prompts(rng, batch, cfg)
        loss, stats = step_loss(sam, batch, prompts, rng, cfg, margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        train_time += time.perf_counter() - t0
        stats.update(lr=lr, margin=margin)
        window.append(stats)
        if step % cfg.log_every == 0 or step == total:
            mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            mean.update(step=step, seconds=round(train_time, 1))
            history.append(mean)
            log("train " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in mean.items()}))
            window = []
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
            run_eval(step, train_time)
    run_eval(step, train_time)

    sam.eval()
    out = Path(cfg.out)
    save_sam_checkpoint(sam, out)
    reloaded = load_sam(SamSpec(ARCH_NAME, str(out)))
    for (name, a), b in zip(sam.state_dict().items(), reloaded.state_dict().values()):
        if not torch.equal(a, b):
            raise RuntimeError(f"checkpoint {out} does not round-trip: {name} differs")
    digest = file_sha256(out)
    result = {
        "config": asdict(cfg),
        "steps": step,
        "train_seconds": round(train_time, 1),
        "images_seen": step * cfg.batch_images,
        "parameters": sum(p.numel() for p in sam.parameters()),
        "checkpoint": out.name,
        "checkpoint_bytes": out.stat().st_size,
        "checkpoint_sha256": digest,
        "command": " ".join(["python", "examples/train_toy_sam.py", *sys.argv[1:]]),
        "reproduce": (
            f"A `--steps` run with the same `--threads` is bit-reproducible on one machine."
            if cfg.steps is not None else
            f"This `--minutes` run fixed its length at {step} steps after measuring its speed; "
            f"`--steps {step} --threads {cfg.threads}` (other options as above) reproduces it bit for bit on one machine."
        ),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "machine": platform.machine(),
        },
        "evals": evals,
        "history": history,
    }
    if cfg.write_card:
        out.with_suffix(".metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(model_card(result))
    log(f"saved {out} ({out.stat().st_size} bytes, sha256 {digest[:16]}...), {step} steps in {train_time:.0f} s")
    return result


def model_card(r: dict[str, Any]) -> str:
    cfg = r["config"]
    first, last = r["evals"][0], r["evals"][-1]

    def row(label: str, key: str, fmt: str = "{:.3f}") -> str:
        a, b = first.get(key), last.get(key)
        show = lambda v: "n/a" if v is None else fmt.format(v)  # noqa: E731
        return f"| {label} | {show(a)} | {show(b)} |"

    return f"""# toy-sam: a tiny SAM trained on batchseg's synthetic world

**What it is.** segment-anything's own `Sam` built with batchseg's `tiny` sizes
(`batchseg.models.sam.SAM_ARCHS["tiny"]`: 256 px canvas, 16 px patches, a 2-block
ViT of width 32, image embedding 32 x 16 x 16, the standard prompt encoder and
two-way mask decoder at width 32), {r["parameters"]:,} parameters, trained from
scratch for {r["steps"]} steps ({r["images_seen"]:,} images, {r["train_seconds"] / 60:.1f} min
of training with {cfg["threads"]} CPU thread{"s" if cfg["threads"] != 1 else ""}) on `batchseg.world` samples
(flat-coloured circles, squares and triangles on muted textures, 64-160 px,
non-square), with point and box prompts against the visible instance masks:
20 x focal + dice on the masks plus a hinge that keeps logits beyond a margin
({cfg["edge_margin_start"]:g}, ramped to {cfg["edge_margin"]:g} over the middle half of training) within 2 px of object edges, so edges are steep enough for SAM's
stability score (multimask output for single points, the lowest-loss mask
learning; single mask for boxes; background points target the empty mask) and
MSE on the IoU head for every output. Script:
`examples/train_toy_sam.py`.

File: `{r["checkpoint"]}` ({r["checkpoint_bytes"]:,} bytes, float32 safetensors,
sha256 `{r["checkpoint_sha256"]}`). Load it as any SAM checkpoint:
`batchseg embed ... --sam-model tiny --sam-checkpoint {r["checkpoint"]}`, or
`batchseg.models.sam.load_sam(SamSpec("tiny", path))`.

**What it is not.** Not a general segmenter: it has only ever seen the synthetic
world; on photographs its masks are meaningless. It is not distilled from SAM
and shares no weights with it. Its masks come from a 64 x 64 low-resolution grid
over a 256 px canvas, so edges are coarse on images much larger than the world's.

## Measured (held-out world seed {cfg["eval_seed"]}, never used in training)

{last["instances"]} instances in {cfg["eval_images"]} images; everything mode on the first
{last.get("everything_images", 0)} images with `generate_proposals` defaults (32 x 32 points,
pred_iou_thresh 0.88, stability 0.95, NMS 0.7) on the fp16 embedding `embed` stores.
IoUs are at original resolution.

| metric | random init (step 0) | this model (step {last["step"]}) |
|---|---|---|
{row("point prompt: mIoU of the mask with the highest predicted IoU", "point_miou_top")}
{row("point prompt: mIoU of the best of the 3 masks", "point_miou_oracle")}
{row("box prompt (tight box): mIoU", "box_miou")}
{row("IoU head: mean abs. error, predicted vs actual", "iou_head_mae")}
{row("everything: masks kept per image", "everything_kept_per_image", "{:.1f}")}
{row("everything: ground-truth instances per image", "everything_gt_per_image", "{:.1f}")}
{row("everything: instance recall at IoU 0.5", "everything_recall50")}
{row("everything: mean best-match IoU per instance", "everything_best_match_miou")}
{row("everything: kept masks matching an instance at IoU 0.5", "everything_precision50")}

## Reproduce

```
{r["command"]}
```

Seed {cfg["seed"]} (model init, prompts, training world seed), batch {cfg["batch_images"]} images,
up to {cfg["points_per_image"]} point prompts per image, box prompts with probability {cfg["box_prob"]},
AdamW lr {cfg["lr"]} (warmup {cfg["warmup_steps"]} steps, cosine to {cfg["min_lr_frac"]} x),
weight decay {cfg["weight_decay"]}, gradient clip {cfg["grad_clip"]}, edge hinge weight {cfg["edge_weight"]}
(margin {cfg["edge_margin_start"]} to {cfg["edge_margin"]}), IoU-head weight {cfg["iou_weight"]}.
torch {r["versions"]["torch"]}, numpy {r["versions"]["numpy"]}, {r["versions"]["machine"]}.
{r["reproduce"]}
Full metrics: `{Path(r["checkpoint"]).with_suffix(".metrics.json").name}`.
"""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=d.out, help="checkpoint path (.safetensors); the card and metrics go next to it")
    ap.add_argument("--minutes", type=float, default=d.minutes, help="training time budget (ignored with --steps)")
    ap.add_argument("--steps", type=int, default=None, help="train exactly this many steps (reproducible)")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--batch-images", type=int, default=d.batch_images)
    ap.add_argument("--points-per-image", type=int, default=d.points_per_image)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--edge-weight", type=float, default=d.edge_weight)
    ap.add_argument("--edge-margin", type=float, default=d.edge_margin)
    ap.add_argument("--edge-margin-start", type=float, default=d.edge_margin_start)
    ap.add_argument("--iou-weight", type=float, default=d.iou_weight)
    ap.add_argument("--init-from", default=None, help="start from this tiny SAM checkpoint instead of random init")
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (0: start and end only)")
    ap.add_argument("--eval-images", type=int, default=d.eval_images)
    ap.add_argument("--eval-everything-images", type=int, default=d.eval_everything_images)
    ap.add_argument("--eval-seed", type=int, default=d.eval_seed)
    ap.add_argument("--log-every", type=int, default=d.log_every)
    a = ap.parse_args(argv)
    return TrainConfig(
        out=a.out, steps=a.steps, minutes=a.minutes, threads=a.threads, seed=a.seed,
        batch_images=a.batch_images, points_per_image=a.points_per_image, lr=a.lr,
        warmup_steps=a.warmup_steps, edge_weight=a.edge_weight, edge_margin=a.edge_margin, edge_margin_start=a.edge_margin_start, iou_weight=a.iou_weight, init_from=a.init_from, eval_every=a.eval_every, eval_images=a.eval_images,
        eval_everything_images=a.eval_everything_images, eval_seed=a.eval_seed, log_every=a.log_every,
    )


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv), log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
