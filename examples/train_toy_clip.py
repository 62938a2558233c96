"""Train the toy CLIP that batchseg ships: a tiny open_clip CLIP, from scratch, on the synthetic world.

Why a dense loss: a tiny CLIP trained with the contrastive caption loss alone learns
image-level alignment, but its MaskCLIP dense features stay at chance (issue 4). So
every step optimises, on one pass over the image tower:

* **contrastive**: CLIP's symmetric InfoNCE between the global image embedding and
  the caption's text embedding. Captions repeat in a batch ("a red circle"), so
  every item with the very same caption counts as a positive (soft targets), not
  as a negative.
* **dense** (x ``--dense-weight``): for each cell of the dense grid, cross entropy
  between ``--dense-scale * cos(dense feature, class text embedding)`` over the 12
  world classes plus "background" and the cell's class mix (the fraction of its
  pixels of each class; its argmax is the cell's majority class). Background pixels
  weigh ``--bg-weight`` (about 80% of all pixels are background); letterbox padding
  is ignored. The dense feature is exactly what the pipeline uses:
  :class:`batchseg.models.clip.DenseClip`'s forward (MaskCLIP value path, official
  form). Text embeddings come from the *current* text tower each step, MaskCLIP-style:
  ``--templates-per-class`` templates drawn at random from the pipeline's 85
  (``MASKCLIP_TEMPLATES``), each embedding L2-normalised, averaged, normalised again,
  so the pipeline's 85-template ensemble lands where training put the classes.
  "background" is the word in the same templates, as ``pseudolabel --background`` makes it.
* **part** (x ``--part-weight``, inside the dense term): the same loss against the
  shape words (circle, square, triangle, background) and against the colour words.
  An image tower learns colour within a few hundred steps and then sits on a
  colour-only solution for long; the shape-word term is a colour-independent push
  towards shape (and teaches the text tower the words on their own).
* **prompt** (x ``--text-weight``, text tower only): InfoNCE between two halves of each
  concept's sampled templates. Without it the class embeddings ignore the shape word
  ("red circle" = "red square", cosine 0.99 after 400 steps), which leaves the image
  tower no gradient to tell shapes apart: a saddle both towers sit on.

Evaluation (periodic, and at the end on the weights as saved and reloaded) uses the
pipeline's own functions: the classifier from ``build_text_classifier`` over the 85
templates with a "background" class, ``maskclip_probs`` (plain, and with key smoothing
+ prompt denoising as ``pseudolabel`` runs by default), bilinear upsampling to the
canvas, per-pixel argmax, and mIoU over 13 classes (12 + background) on held-out world
images (seed 999 by default; training uses world seed ``100000 + --seed``; the demo
uses 4242).

Tower kinds (``--arch``): ``vit`` (the shipped ``toy-clip``: 16 px patches, learns colour
but hardly shape), ``resnet`` (open_clip ModifiedResNet) and ``convnext`` (the shipped
``toy-clip-cnn``): open_clip's timm tower running a registered timm ConvNeXt
(``--timm-model``, default ``test_convnext``: depths 1-2-4-2, widths 24-64, 0.2 M
parameters; open_clip cannot pass depths or widths to timm, so the architecture is a
timm model name), stride 32, dense features = the tower's head (LayerNorm + projection)
at each location of the last feature map (:mod:`batchseg.models.clip_timm`). A CNN
learns shape in hundreds of steps where the 16 px-patch ViT did not in thousands.
On a CPU shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE`` (same results): on
the 2-core VM at load 10-12 a step took 5.5 s with spinning OpenMP threads and 1.1 s
without (two runs minutes apart, not a controlled comparison).

Reproducible: the data of step ``t`` is ``sample_batch(world_seed, t * batch, batch)``,
template draws come from a seeded generator, and the weights from ``torch.manual_seed``.
With ``--steps`` the result is a function of the arguments (and of ``--threads``:
float reductions may differ with the thread count). With ``--minutes`` (the default)
the number of steps is fixed once, from the measured speed of the first steps, and
written to the model card, so ``--steps N`` with the same other arguments redoes the run.

    .venv/bin/python examples/train_toy_clip.py                 # 25 min on 2 threads -> batchseg/assets/toy-clip
    .venv/bin/python examples/train_toy_clip.py --steps 50 --out /tmp/toy-clip   # a quick look
    .venv/bin/python examples/train_toy_clip.py --arch resnet --image-size 256 --vision-width 16 --vision-layers 1
        # open_clip ModifiedResNet tower (stride 32: an 8x8 grid on a 256 px canvas)
    .venv/bin/python examples/train_toy_clip.py --arch convnext --image-size 256 --threads 2
        # open_clip timm tower (--timm-model, a ConvNeXt; stride 32: an 8x8 grid) -> batchseg/assets/toy-clip-cnn
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from batchseg.io.hashing import file_sha256  # noqa: E402
from batchseg.labels.maskclip import maskclip_probs, upsample_to_canvas  # noqa: E402
from batchseg.labels.metrics import confusion, scores_from_confusion  # noqa: E402
from batchseg.models.clip_resnet import RESNET_STRIDE  # noqa: E402
from batchseg.models.clip import (  # noqa: E402
    CONFIG_FILE,
    LOCAL_DIR,
    WEIGHTS_FILE,
    ClipSpec,
    DenseClip,
    load_dense_clip,
)
from batchseg.models.text import MASKCLIP_TEMPLATES, Vocabulary, build_text_classifier, fill_template  # noqa: E402
from batchseg.world import CLASS_NAMES, COLOURS, IGNORE, SHAPES, sample_batch, semantic_to_class_ids  # noqa: E402

DEFAULT_OUT = REPO / "batchseg" / "assets" / "toy-clip"
DEFAULT_CNN_OUT = REPO / "batchseg" / "assets" / "toy-clip-cnn"  # where --arch convnext writes by default
CONVNEXT_STRIDE = 32  # timm ConvNeXt: a 4x4 stem, then three 2x2 downsamplings; fixed by the architecture
BACKGROUND_NAME = "background"
NUM_CLASSES = len(CLASS_NAMES) + 1  # 12 world classes, then background (last, as with_background makes it)
WORLD_SEED_OFFSET = 100_000  # training world seed = offset + --seed: far from eval (999), demo (4242), tests
CARD_FILE = "MODEL_CARD.md"
LOG_FILE = "training_log.json"


@dataclass
class TrainConfig:
    """Everything that determines a run (and its defaults: the shipped model's settings)."""

    out: str = str(DEFAULT_OUT)
    minutes: float | None = 25.0  # time budget for the whole run (used when steps is None)
    steps: int | None = None
    threads: int = 2
    seed: int = 0
    # model
    arch: str = "vit"  # or "resnet" (open_clip ModifiedResNet; stride 32, vision_layers blocks per stage)
    # or "convnext" (open_clip timm tower running `timm_model`; stride 32; vision_width/layers unused)
    timm_model: str = "test_convnext"  # a registered timm ConvNeXt: open_clip cannot pass depths/dims to timm
    image_size: int = 128
    patch_size: int = 16
    vision_width: int = 128
    vision_layers: int = 4
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 32
    # optimisation
    batch_size: int = 16  # small batches: more updates per image; each image gives 64 patch targets
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    grad_clip: float = 1.0
    dense_weight: float = 3.0
    dense_scale: float = 15.0  # logit scale of the dense loss (~CLIP's initial 1/0.07); eval uses MaskCLIP's 100
    bg_weight: float = 0.2  # weight of background pixels in the dense loss (objects: 1); ~80% of pixels are background
    part_weight: float = 1.0  # dense loss over shape words and over colour words, too
    text_weight: float = 1.0  # class-prompt discrimination loss (text tower only)
    shape_steps: int = 0  # first phase: dense loss over the shape words only, no contrastive term
    templates_per_class: int = 4
    # evaluation
    eval_every: int = 500
    eval_images: int = 100
    eval_seed: int = 999
    # bookkeeping
    save_dtype: str = "float16"
    write_card: bool = True

    @property
    def stride(self) -> int:
        """Canvas pixels per dense-grid cell."""
        if self.arch == "convnext":
            return CONVNEXT_STRIDE
        return RESNET_STRIDE if self.arch == "resnet" else self.patch_size

    @property
    def world_seed(self) -> int:
        return WORLD_SEED_OFFSET + self.seed


def model_config(cfg: TrainConfig) -> dict:
    """The open_clip ``model_cfg`` (stored in ``open_clip_config.json``)."""
    if cfg.arch == "resnet":  # a list of layers selects open_clip's ModifiedResNet
        vision = {"image_size": cfg.image_size, "layers": [cfg.vision_layers] * 4, "width": cfg.vision_width,
                  "head_width": 32}
    elif cfg.arch == "convnext":  # open_clip's TimmModel: timm's pool + norm, then a linear projection
        vision = {"timm_model_name": cfg.timm_model, "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "image_size": cfg.image_size}
    elif cfg.arch == "vit":
        vision = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                  "layers": cfg.vision_layers, "head_width": 32}
    else:
        raise ValueError(f"arch must be 'vit', 'resnet' or 'convnext', got {cfg.arch!r}")
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": vision,
        "text_cfg": {
            # open_clip's tokenizer (vocabulary 49408) reads context_length from this config.
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": max(1, cfg.text_width // 32),
            "layers": cfg.text_layers,
        },
    }


def open_clip_config(cfg: TrainConfig) -> dict:
    """``open_clip_config.json`` content, as ``batchseg.models.clip.save_local_dir`` writes it.

    No ``fill_color``: the model is trained on letterboxes padded with the mean colour
    (:func:`to_pixels`), which is what batchseg uses when the config states no fill.
    """
    preprocess = asdict(PreprocessCfg())
    preprocess.pop("fill_color")
    preprocess["size"] = cfg.image_size
    return {"model_cfg": model_config(cfg), "preprocess_cfg": preprocess}


# ----------------------------------------------------------------------------- data


def to_pixels(images: np.ndarray, semantic: np.ndarray, mean: Tensor, std: Tensor) -> Tensor:
    """(B, S, S, 3) uint8 letterboxed images -> (B, 3, S, S) normalised; padding 0 (the mean colour),
    exactly as ``batchseg.models.clip.preprocess_clip`` pads."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    pad = torch.from_numpy(semantic == IGNORE)[:, None]
    return x.masked_fill_(pad, 0.0)


def semantic_to_targets(semantic: np.ndarray) -> np.ndarray:
    """(B, S, S) VOC-style uint8 -> (B, S, S) int64 class ids in the training order:
    world class k -> k, background -> 12, padding -> 255."""
    return semantic_to_class_ids(semantic, background=NUM_CLASSES - 1, ignore=IGNORE).astype(np.int64)


def patch_targets(semantic: np.ndarray, patch: int) -> tuple[Tensor, Tensor]:
    """Per-patch class mix: (B, 13, g, g) fractions over the non-padding pixels and
    (B, g, g) the non-padding fraction of each patch (0 for an all-padding patch)."""
    ids = np.minimum(semantic_to_targets(semantic), NUM_CLASSES)  # padding -> an extra class
    n, size = ids.shape[:2]
    g = size // patch
    # Histogram per (image, cell) with one bincount: a (B, S, S, 14) one-hot would be ~100 MB at 256 px.
    cell = (np.arange(size) // patch)[:, None] * g + (np.arange(size) // patch)[None, :]  # (S, S)
    keys = (np.arange(n)[:, None, None] * (g * g) + cell) * (NUM_CLASSES + 1) + ids
    counts = np.bincount(keys.ravel(), minlength=n * g * g * (NUM_CLASSES + 1))
    counts = torch.from_numpy(counts.reshape(n, g, g, NUM_CLASSES + 1)).permute(0, 3, 1, 2).float()
    frac = counts / (patch * patch)  # (B, 14, g, g)
    valid = frac[:, :NUM_CLASSES].sum(1)
    mix = frac[:, :NUM_CLASSES] / valid.clamp_min(1e-6)[:, None]
    return mix, valid


def batch_for_step(cfg: TrainConfig, step: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return sample_batch(cfg.world_seed, step * cfg.batch_size, cfg.batch_size, cfg.image_size)


# ----------------------------------------------------------------------------- losses


# Text "concepts" embedded every step: the 13 classes, then the shape words, then the colour words.
CONCEPTS: tuple[str, ...] = (*CLASS_NAMES, BACKGROUND_NAME, *SHAPES, *COLOURS)
_SHAPE_IDS = [CONCEPTS.index(x) for x in SHAPES] + [NUM_CLASSES - 1]  # + background
_COLOUR_IDS = [CONCEPTS.index(x) for x in COLOURS] + [NUM_CLASSES - 1]


def _part_matrix(part: str) -> Tensor:
    """(13, P + 1) 0/1: which shape (or colour) each class has; background -> last column."""
    names = SHAPES if part == "shape" else tuple(COLOURS)
    out = torch.zeros(NUM_CLASSES, len(names) + 1)
    for k, name in enumerate(CLASS_NAMES):
        colour, shape = name.split(" ")
        out[k, names.index(shape if part == "shape" else colour)] = 1.0
    out[NUM_CLASSES - 1, len(names)] = 1.0
    return out


_SHAPE_OF, _COLOUR_OF = _part_matrix("shape"), _part_matrix("colour")


def concept_prompts(rng: np.random.Generator, per_concept: int) -> list[str]:
    """``per_concept`` templates for each of ``CONCEPTS``, drawn without replacement from the 85."""
    prompts = []
    for name in CONCEPTS:
        for t in rng.choice(len(MASKCLIP_TEMPLATES), size=per_concept, replace=False):
            prompts.append(fill_template(MASKCLIP_TEMPLATES[int(t)], name))
    return prompts


def concept_embeddings(text_emb: Tensor, per_concept: int) -> Tensor:
    """(len(CONCEPTS) * per_concept, D) prompt embeddings -> (len(CONCEPTS), D) unit embeddings
    (the mean of unit prompt embeddings, normalised: ``build_text_classifier``'s ensembling)."""
    unit = F.normalize(text_emb, dim=-1).view(len(CONCEPTS), per_concept, -1)
    return F.normalize(unit.mean(1), dim=-1)


def prompt_loss(text_emb: Tensor, per_concept: int, scale: float = 10.0) -> Tensor:
    """Text-only InfoNCE between two halves of each concept's prompts: the mean of one half of
    the templates must be nearer its own concept's other half than any other concept's.

    Breaks a saddle the two towers otherwise sit on for long: while the class text
    embeddings ignore the shape word ("red circle" = "red square") the image tower gets
    no gradient to tell shapes apart, and while patch features ignore shape the dense
    loss gives the text tower none either.
    """
    unit = F.normalize(text_emb, dim=-1).view(len(CONCEPTS), per_concept, -1)
    half = per_concept // 2
    a = F.normalize(unit[:, :half].mean(1), dim=-1)
    b = F.normalize(unit[:, half:].mean(1), dim=-1)
    logits = scale * a @ b.T
    target = torch.arange(len(CONCEPTS))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, captions: list[str]) -> Tensor:
    """Symmetric InfoNCE; items with identical captions are all positives of each other."""
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = (cid[:, None] == cid[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def dense_loss(dense: Tensor, concepts: Tensor, mix: Tensor, valid: Tensor, scale: float,
               bg_weight: float = 1.0, part_weight: float = 0.0, shape_only: bool = False) -> Tensor:
    """Soft cross entropy per patch between ``scale * cos(dense, class embeddings)`` over the 13
    classes and the patch's class mix, weighted by its non-padding fraction, background pixels
    counting ``bg_weight``.

    With ``part_weight`` > 0, the same loss is added (times ``part_weight``) over the shape
    words (circle, square, triangle, background) and over the colour words: a direct,
    colour-independent signal for shape, which the 13-way loss alone gives only slowly
    (an image tower first learns colour, and then sits there). ``shape_only``: the shape
    term alone (the first phase of training, see ``TrainConfig.shape_steps``).
    """
    feats = F.normalize(dense, dim=1)  # (B, D, g, g)
    weight = valid * (1.0 - (1.0 - bg_weight) * mix[:, -1])
    norm = weight.sum().clamp_min(1e-6)

    def term(ids: list[int], target: Tensor) -> Tensor:
        logits = scale * torch.einsum("bdhw,cd->bchw", feats, concepts[ids])
        ce = -(target * F.log_softmax(logits, dim=1)).sum(1)  # (B, g, g)
        return (ce * weight).sum() / norm

    shape_mix = torch.einsum("bkhw,kc->bchw", mix, _SHAPE_OF)
    if shape_only:
        return term(_SHAPE_IDS, shape_mix)
    loss = term(list(range(NUM_CLASSES)), mix)
    if part_weight:
        colour_mix = torch.einsum("bkhw,kc->bchw", mix, _COLOUR_OF)
        loss = loss + part_weight * (term(_SHAPE_IDS, shape_mix) + term(_COLOUR_IDS, colour_mix))
    return loss


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalSet:
    pixels: Tensor  # (N, 3, S, S)
    targets: np.ndarray  # (N, S, S) training-order class ids, 255 padding
    patch_major: Tensor  # (N, g, g) majority class of each patch, -1 where mostly padding
    captions: list[str]
    mix: Tensor  # (N, 13, g, g) class mix of each cell (for the oracle ceilings)


def make_eval_set(cfg: TrainConfig, mean: Tensor, std: Tensor) -> EvalSet:
    images, semantic, captions = sample_batch(cfg.eval_seed, 0, cfg.eval_images, cfg.image_size)
    mix, valid = patch_targets(semantic, cfg.stride)
    major = mix.argmax(1).masked_fill(valid < 0.5, -1)
    return EvalSet(to_pixels(images, semantic, mean, std), semantic_to_targets(semantic), major, captions, mix)


def oracle_scores(data: EvalSet, canvas: int) -> dict:
    """mIoU ceilings of the grid itself, scored like :func:`evaluate`: a perfect cell classifier
    (each cell's true class mix as its probabilities), and a perfect *colour-only* one (each
    colour's mass put on its first shape), which is what a model that never learned shape gets."""
    colour_only = data.mix.clone()
    for c in range(len(COLOURS)):
        k = c * len(SHAPES)
        colour_only[:, k] = data.mix[:, k : k + len(SHAPES)].sum(1)
        colour_only[:, k + 1 : k + len(SHAPES)] = 0
    out = {}
    for name, probs in (("cell_oracle", data.mix), ("colour_only_oracle", colour_only)):
        conf = sum(confusion(upsample_to_canvas(p, canvas).argmax(0).numpy(), t, NUM_CLASSES, ignore=IGNORE)
                   for p, t in zip(probs, data.targets))
        out[name] = scores_from_confusion(conf).miou
    return out


def eval_vocabulary() -> Vocabulary:
    names = (*CLASS_NAMES, BACKGROUND_NAME)  # = batchseg.labels.text_cache.with_background(world classes)
    return Vocabulary(names=names, synonyms=tuple((n,) for n in names))


def part_hits_on_objects(pred: Tensor, major: Tensor) -> dict[str, int]:
    """Among cells whose majority class is an object (``0 <= major < 12``), how many have a
    predicted class of the right shape, and of the right colour (a predicted "background" is
    wrong for both). ``pred``, ``major``: (g, g) class ids in the training order, ``major`` -1
    for mostly-padding cells. Returns {"shape": hits, "colour": hits, "cells": object cells}.
    Shape accuracy separates a model that knows shape from a colour-only one (chance 1/3)."""
    obj = (major >= 0) & (major < NUM_CLASSES - 1)
    out = {"cells": int(obj.sum())}
    for part, table in (("shape", _SHAPE_OF), ("colour", _COLOUR_OF)):
        column = table.argmax(1)  # class id -> its shape (colour) index; background -> the extra one
        out[part] = int(((column[pred] == column[major.clamp_min(0)]) & obj).sum())
    return out


@torch.no_grad()
def evaluate(clip: DenseClip, tokenizer: Callable, data: EvalSet, batch: int = 50) -> dict:
    """MaskCLIP scores of ``clip`` on ``data`` through the pipeline's own functions.

    Returns mIoU / pixel accuracy over 13 classes (12 + background) on canvas pixels
    for ``plain`` (no key smoothing, no prompt denoising) and ``ks_pd`` (both, the
    ``pseudolabel`` default), patch accuracy of the plain grid argmax against each
    patch's majority class, and image->caption top-1 retrieval (a retrieved caption
    counts when its text equals the image's own).
    """
    model = clip.model
    was_training = model.training
    model.eval()
    try:
        return _evaluate(clip, tokenizer, data, batch)
    finally:
        model.train(was_training)


def _evaluate(clip: DenseClip, tokenizer: Callable, data: EvalSet, batch: int) -> dict:
    model = clip.model
    classifier = build_text_classifier(model, tokenizer, eval_vocabulary(), MASKCLIP_TEMPLATES)
    conf = {"plain": np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)}
    conf["ks_pd"] = conf["plain"].copy()
    patch_hit = patch_total = 0
    part_hits = {"shape": 0, "colour": 0, "cells": 0}
    globals_ = []
    for start in range(0, len(data.pixels), batch):
        out = clip(data.pixels[start : start + batch])
        globals_.append(out.global_.float())
        for i in range(out.dense.shape[0]):
            n = start + i
            for name, on in (("plain", False), ("ks_pd", True)):
                probs = maskclip_probs(out.dense[i], out.keys[i], classifier, key_smoothing=on, prompt_denoising=on)
                if name == "plain":
                    grid = probs.argmax(0)
                    major = data.patch_major[n]
                    patch_hit += int(((grid == major) & (major >= 0)).sum())
                    patch_total += int((major >= 0).sum())
                    for key, hits in part_hits_on_objects(grid, major).items():
                        part_hits[key] += hits
                pred = upsample_to_canvas(probs, clip.canvas).argmax(0).numpy()
                conf[name] += confusion(pred, data.targets[n], NUM_CLASSES, ignore=IGNORE)
    result = {}
    for name, c in conf.items():
        s = scores_from_confusion(c)
        result[f"miou_{name}"] = s.miou
        result[f"pixel_acc_{name}"] = s.pixel_accuracy
        result[f"iou_{name}"] = [None if math.isnan(v) else round(float(v), 4) for v in s.iou]
    result["patch_acc"] = patch_hit / max(patch_total, 1)
    for part in ("shape", "colour"):
        result[f"object_{part}_acc"] = part_hits[part] / max(part_hits["cells"], 1)
    unique = list(dict.fromkeys(data.captions))
    txt = F.normalize(model.encode_text(tokenizer(unique)).float(), dim=-1)
    best = (F.normalize(torch.cat(globals_), dim=-1) @ txt.T).argmax(1)
    result["caption_top1"] = float(np.mean([unique[int(b)] == c for b, c in zip(best, data.captions)]))
    return result


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    losses: list[dict] = field(default_factory=list)  # per step: total, contrastive, dense
    evals: list[dict] = field(default_factory=list)  # {"step": t, **scores}
    final: dict = field(default_factory=dict)  # scores of the saved (reloaded) weights
    oracle: dict = field(default_factory=dict)  # mIoU ceilings of the grid (see oracle_scores)
    planned_steps: int | None = None  # differs from steps when a --minutes run stopped early
    random_init: dict = field(default_factory=dict)  # scores at step 0


def build_model(cfg: TrainConfig) -> tuple[DenseClip, Callable]:
    """Seeded random-init model wrapped in DenseClip (with gradients re-enabled) and its tokenizer."""
    from open_clip.model import CLIP

    torch.manual_seed(cfg.seed)
    model = CLIP(**model_config(cfg))
    pp = PreprocessCfg()
    clip = DenseClip(model, mean=pp.mean, std=pp.std)  # freezes the model: unfreeze to train it
    model.requires_grad_(True)
    model.train()  # DenseClip pins itself to eval; the CLIP inside trains (BatchNorm batch statistics)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
    return clip, tokenizer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on gains, biases, embeddings, logit scale
    (unused token rows then stay as initialised instead of decaying)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def save_model(clip: DenseClip, cfg: TrainConfig, out: Path) -> None:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` (each via a temp name)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.save_dtype]
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in clip.model.state_dict().items()}  # BatchNorm's integer counters stay integers
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(open_clip_config(cfg), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / CONFIG_FILE)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train, evaluate, save to ``cfg.out``; return the history. Deterministic for fixed ``cfg``
    when ``cfg.steps`` is set (and the thread count is the same)."""
    if cfg.steps is None and cfg.minutes is None:
        raise ValueError("give steps or minutes")
    if cfg.steps is None and cfg.warmup < 15:
        raise ValueError("a --minutes run fixes its step count during the first 15 steps: use --warmup >= 15 or --steps")
    if cfg.image_size % cfg.stride:
        raise ValueError(f"image size {cfg.image_size} is not a multiple of the grid stride {cfg.stride}")
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    budget = None if cfg.minutes is None else cfg.minutes * 60.0
    out = Path(cfg.out)
    clip, tokenizer = build_model(cfg)
    model = clip.model
    mean, std = torch.tensor(clip.mean), torch.tensor(clip.std)
    data = make_eval_set(cfg, mean, std)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([cfg.seed, 7])  # template draws
    result = TrainResult(out=out, steps=0, seconds=0.0)

    result.oracle = oracle_scores(data, clip.canvas)
    t0 = time.perf_counter()
    result.random_init = evaluate(clip, tokenizer, data)
    eval_seconds = time.perf_counter() - t0
    result.evals.append({"step": 0, **result.random_init})
    log(f"step 0 (random init): {_fmt(result.random_init)}  [eval {eval_seconds:.1f}s]")

    total = cfg.steps
    calib_from, calib_to = 3, 15  # steps timed to fix `total` under a time budget (inside the warm-up,
    # whose learning rates do not depend on `total`, so `--steps total` later gives the same run)
    t_calib = None
    pool = ThreadPoolExecutor(1)  # renders the next batch while this one trains
    pending = pool.submit(batch_for_step, cfg, 0)
    step = 0
    try:
        while total is None or step < total:
            images, semantic, captions = pending.result()
            if total is None or step + 1 < total:
                pending = pool.submit(batch_for_step, cfg, step + 1)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total or 10**9, cfg)
            pixels = to_pixels(images, semantic, mean, std)
            mix, valid = patch_targets(semantic, cfg.stride)
            prompts = concept_prompts(rng, cfg.templates_per_class)
            tokens = tokenizer(prompts + captions)
            text = model.encode_text(tokens)
            out_ = clip(pixels)
            concepts = concept_embeddings(text[: len(prompts)], cfg.templates_per_class)
            shape_phase = step < cfg.shape_steps
            l_con = contrastive_loss(out_.global_, text[len(prompts) :], model.logit_scale, captions)
            l_den = dense_loss(out_.dense, concepts, mix, valid, cfg.dense_scale, cfg.bg_weight, cfg.part_weight,
                               shape_only=shape_phase)
            loss = cfg.dense_weight * l_den + (0.0 if shape_phase else l_con)
            if cfg.text_weight and cfg.templates_per_class >= 2:
                l_txt = prompt_loss(text[: len(prompts)], cfg.templates_per_class)
                loss = loss + cfg.text_weight * l_txt
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            result.losses.append({"loss": loss.item(), "contrastive": l_con.item(), "dense": l_den.item()})

            if total is None and step == calib_from:
                t_calib = time.perf_counter()
            if total is None and step == calib_to:
                per_step = (time.perf_counter() - t_calib) / (calib_to - calib_from)
                left = budget - (time.perf_counter() - t_start) - 2 * eval_seconds - 5.0  # final eval + save
                per_step_all = per_step + eval_seconds / max(cfg.eval_every, 1)
                total = max(step, step + int(left / per_step_all))
                log(f"{per_step:.2f} s/step measured over steps {calib_from}-{calib_to}: training {total} steps "
                    f"to fit {cfg.minutes:g} minutes (reproduce with --steps {total})")

            if step % 25 == 0 or step == total:
                recent = result.losses[-25:]
                log(f"step {step}/{total or '?'}  loss {np.mean([r['loss'] for r in recent]):.3f}  "
                    f"contrastive {np.mean([r['contrastive'] for r in recent]):.3f}  "
                    f"dense {np.mean([r['dense'] for r in recent]):.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                    f"{time.perf_counter() - t_start:.0f}s")
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                scores = evaluate(clip, tokenizer, data)
                result.evals.append({"step": step, **scores})
                log(f"step {step}: {_fmt(scores)}")
            if budget is not None and cfg.steps is None and time.perf_counter() - t_start > 1.15 * budget:
                log(f"stopping early at step {step}: over 1.15x the time budget")
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    result.steps, result.planned_steps = step, total
    train_seconds = time.perf_counter() - t_start

    save_model(clip, cfg, out)
    # Score the weights as shipped (saved dtype), loaded the way the pipeline loads them.
    shipped = load_dense_clip(ClipSpec(LOCAL_DIR + str(out)))
    result.final = evaluate(shipped, open_clip.get_tokenizer(LOCAL_DIR + str(out)), data)
    result.evals.append({"step": step, "saved": True, **result.final})
    result.seconds = time.perf_counter() - t_start
    log(f"step {step} (saved, reloaded): {_fmt(result.final)}")
    log(f"trained {step} steps in {train_seconds:.0f}s; total {result.seconds:.0f}s")
    (out / LOG_FILE).write_text(json.dumps(
        {"config": asdict(cfg), "steps": step, "seconds": result.seconds, "oracle": result.oracle, "evals": result.evals,
         "losses": [{k: round(v, 5) for k, v in r.items()} for r in result.losses]}, indent=1) + "\n")
    if cfg.write_card:
        (out / CARD_FILE).write_text(model_card(cfg, result), encoding="utf-8")
    return result


def _fmt(s: dict) -> str:
    return (f"mIoU plain {s['miou_plain']:.3f}  mIoU ks+pd {s['miou_ks_pd']:.3f}  "
            f"patch acc {s['patch_acc']:.3f}  object-cell shape acc {s['object_shape_acc']:.3f}  "
            f"colour acc {s['object_colour_acc']:.3f}  caption top1 {s['caption_top1']:.3f}")


def command_for(cfg: TrainConfig, steps: int) -> str:
    default = TrainConfig()
    args = ["examples/train_toy_clip.py", "--steps", str(steps)]
    for name, flag in _FLAGS.items():
        value = getattr(cfg, name)
        if value != getattr(default, name) and name not in ("steps", "minutes", "out"):
            args += [flag, str(value)]
    if Path(cfg.out).resolve() != default_out(cfg.arch).resolve():
        args += ["--out", str(cfg.out)]
    return ".venv/bin/python " + shlex.join(args)


def model_card(cfg: TrainConfig, r: TrainResult) -> str:
    init, fin = r.random_init, r.final
    weights = Path(cfg.out) / WEIGHTS_FILE
    size_mb = weights.stat().st_size / 1e6 if weights.exists() else float("nan")
    sha256 = file_sha256(weights) if weights.exists() else "(not written)"
    n_params = sum(int(np.prod(v)) for v in _param_shapes(cfg))
    grid = cfg.image_size // cfg.stride
    early = "" if (r.planned_steps or r.steps) == r.steps else (
        f"\n(This run was planned for {r.planned_steps} steps and stopped early at {r.steps}, over its time budget:\n"
        "its learning rate had not decayed to 0, and the command above trains the full plan.)\n")
    per_class = "\n".join(
        f"| {name} | {_iou(init['iou_plain'][k])} | {_iou(fin['iou_plain'][k])} | {_iou(fin['iou_ks_pd'][k])} |"
        for k, name in enumerate((*CLASS_NAMES, BACKGROUND_NAME))
    )
    if cfg.arch == "convnext":
        tower = (f"timm `{cfg.timm_model}` ConvNeXt ({_convnext_shape(cfg.timm_model)}) through open_clip's TimmModel, "
                 f"{cfg.image_size} px canvas, stride "
                 f"{cfg.stride} (a {grid}x{grid} grid); dense form = the tower's head per location (the trunk head's "
                 "LayerNorm, then the projection, as FC-CLIP uses a frozen ConvNeXt CLIP)")
    elif cfg.arch == "resnet":
        tower = (f"open_clip ModifiedResNet, {cfg.image_size} px canvas, stride {cfg.stride} (a {grid}x{grid} grid: coarse on "
                 f"purpose), width {cfg.vision_width}, {cfg.vision_layers} block(s) per stage; MaskCLIP's ResNet dense form "
                 "c_proj(v_proj(layer4))")
    else:
        tower = (f"ViT, {cfg.image_size} px canvas, {cfg.patch_size} px patches (a {grid}x{grid} grid: coarse on purpose), "
                 f"width {cfg.vision_width}, {cfg.vision_layers} blocks; MaskCLIP's official value-path dense form")
    name = Path(cfg.out).name
    return f"""# {name}: a tiny CLIP that knows only batchseg's synthetic world

**What it is.** An open_clip CLIP ({n_params / 1e6:.2f} M parameters; weights stored as
{cfg.save_dtype}, {size_mb:.1f} MB) trained from scratch by `examples/train_toy_clip.py` on
images of `batchseg.world` (flat-coloured circles, squares and triangles in red, green,
blue and yellow on muted textured backgrounds) so that batchseg's demo and tests show
meaningful labels on a machine that cannot download real CLIP weights.

- Image tower: {tower}; joint space {cfg.embed_dim}-d.
- Text tower: width {cfg.text_width}, {cfg.text_layers} blocks, context length {cfg.context_length}, open_clip's
  standard BPE vocabulary (49408 tokens; most of the embedding table is untrained).
- Weights: `{WEIGHTS_FILE}`, sha256 `{sha256}`.
- Format: open_clip `local-dir:` (`{CONFIG_FILE}` + `{WEIGHTS_FILE}`):
  `batchseg embed ... --clip-model local-dir:batchseg/assets/{name}`,
  `open_clip.create_model("local-dir:...")`, `open_clip.get_tokenizer("local-dir:...")`.

**How it was trained.** {r.steps} steps of {cfg.batch_size} images ({r.steps * cfg.batch_size} samples of world seed
{cfg.world_seed}, never repeated), AdamW (lr {cfg.lr:g}, {cfg.warmup} warm-up steps, cosine decay,
weight decay {cfg.weight_decay:g} on matrices), {cfg.threads} CPU threads, seed {cfg.seed}; {r.seconds / 60:.1f} minutes in all.
Loss = CLIP contrastive loss on the world's captions ("a red circle and two blue
triangles"; identical captions are positives of each other)
+ {cfg.dense_weight:g} x a dense loss: for each grid cell, cross entropy between {cfg.dense_scale:g} x cos(MaskCLIP dense
feature, class text embedding) over the 12 classes + "background" and the cell's class mix
(background pixels weigh {cfg.bg_weight:g}), plus {cfg.part_weight:g} x the same against the shape words and against the
colour words
+ {cfg.text_weight:g} x a text-only loss that keeps the concepts' prompt embeddings apart.
The dense feature is the pipeline's own (`DenseClip`); text embeddings come from the current
text tower, averaging {cfg.templates_per_class} of the 85 MaskCLIP prompt templates drawn at random each step.
The dense loss is what makes MaskCLIP labels work: with the contrastive loss alone the dense
features of such a model stay at chance.

**Measured** (held-out world seed {cfg.eval_seed}, first {cfg.eval_images} images, {cfg.image_size} px canvas pixels, padding not
scored; classifier = `build_text_classifier` over the 85 MaskCLIP templates with a "background" class;
labels = argmax of `maskclip_probs` upsampled bilinearly; mIoU over the 13 classes):

| | random init (step 0) | this model |
|---|---|---|
| MaskCLIP mIoU (no key smoothing, no prompt denoising) | {init['miou_plain']:.3f} | {fin['miou_plain']:.3f} |
| MaskCLIP mIoU (key smoothing + prompt denoising, `pseudolabel --background` default) | {init['miou_ks_pd']:.3f} | {fin['miou_ks_pd']:.3f} |
| pixel accuracy (plain) | {init['pixel_acc_plain']:.3f} | {fin['pixel_acc_plain']:.3f} |
| cell accuracy vs each cell's majority class (plain) | {init['patch_acc']:.3f} | {fin['patch_acc']:.3f} |
| object cells (majority class an object): shape of the predicted class right (chance 0.33) | {init['object_shape_acc']:.3f} | {fin['object_shape_acc']:.3f} |
| object cells: colour of the predicted class right (chance 0.25) | {init['object_colour_acc']:.3f} | {fin['object_colour_acc']:.3f} |
| image -> caption top-1 among the {len(set(_eval_captions(cfg)))} distinct captions | {init['caption_top1']:.3f} | {fin['caption_top1']:.3f} |

Ceilings of a {grid}x{grid} grid on the same images, scored the same way: {r.oracle.get('cell_oracle', float('nan')):.3f} for a perfect
cell classifier; {r.oracle.get('colour_only_oracle', float('nan')):.3f} for a perfect classifier that knows colour but not shape.
A model near the second number has learnt colour and background but not shape: in the
table below, each colour then has one shape with a clearly non-zero IoU and two near 0.

Per-class IoU:

| class | random init (plain) | this model (plain) | this model (ks+pd) |
|---|---|---|---|
{per_class}

Scores of the weights as saved ({cfg.save_dtype}), reloaded through `load_dense_clip`. Training
history: `{LOG_FILE}`.

**Reproduce** (same arguments and thread count give the same weights):

    {command_for(cfg, r.planned_steps or r.steps)}
{early}
(torch {torch.__version__}, open_clip {open_clip.__version__}, Python {platform.python_version()}.)

**What it is NOT.** Not a general CLIP: it has seen nothing but this synthetic world; it knows
12 class names, their colour and shape words, "background" and caption words, and its embeddings
of any other word are meaningless. Its dense labels are coarse ({cfg.stride} px cells on a {cfg.image_size} px
canvas), which is the regime where SAM refinement and self-training are meant to help. Do not use
it to judge batchseg's quality on real images, and do not use world seed {cfg.world_seed} for evaluation.
"""


def _convnext_shape(name: str) -> str:
    """"depths 1-1-1-1, widths 32-64-96-128" of a registered timm ConvNeXt (built on the meta device)."""
    import timm

    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False)
    depths = "-".join(str(len(stage.blocks)) for stage in trunk.stages)
    widths = "-".join(str(info["num_chs"]) for info in trunk.feature_info)
    return f"depths {depths}, widths {widths}"


def _iou(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _eval_captions(cfg: TrainConfig) -> list[str]:
    return sample_batch(cfg.eval_seed, 0, cfg.eval_images, 8)[2]


def _param_shapes(cfg: TrainConfig) -> list[tuple[int, ...]]:
    from open_clip.model import CLIP

    with torch.device("meta"):
        return [tuple(p.shape) for p in CLIP(**model_config(cfg)).parameters()]


_FLAGS = {
    "threads": "--threads", "seed": "--seed", "arch": "--arch", "timm_model": "--timm-model", "image_size": "--image-size", "patch_size": "--patch-size",
    "vision_width": "--vision-width", "vision_layers": "--vision-layers", "embed_dim": "--embed-dim",
    "text_width": "--text-width", "text_layers": "--text-layers",  "context_length": "--context-length",
    "batch_size": "--batch-size", "lr": "--lr", "weight_decay": "--weight-decay", "warmup": "--warmup",
    "grad_clip": "--grad-clip", "dense_weight": "--dense-weight", "dense_scale": "--dense-scale", "bg_weight": "--bg-weight", "part_weight": "--part-weight", "text_weight": "--text-weight", "shape_steps": "--shape-steps",
    "templates_per_class": "--templates-per-class", "eval_every": "--eval-every", "eval_images": "--eval-images",
    "eval_seed": "--eval-seed", "save_dtype": "--save-dtype",
}


def default_out(arch: str) -> Path:
    """Where a run writes without ``--out``: the shipped asset folder of its tower kind."""
    return DEFAULT_CNN_OUT if arch == "convnext" else DEFAULT_OUT


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help=f"output folder (open_clip local-dir format + MODEL_CARD.md); default {DEFAULT_OUT} "
                   f"({DEFAULT_CNN_OUT} with --arch convnext)")
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help="time budget of the whole run; the step count is fixed from the speed of the first steps")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides --minutes)")
    choices = {"arch": ("vit", "resnet", "convnext"), "save_dtype": ("float16", "bfloat16", "float32")}
    for name, flag in _FLAGS.items():
        default = getattr(d, name)
        p.add_argument(flag, type=type(default), default=default, choices=choices.get(name), help=f"default {default}")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = str(default_out(a.arch))
    cfg = TrainConfig(**{k: getattr(a, k) for k in ("out", "minutes", "steps", *_FLAGS)})
    if cfg.steps is not None:
        cfg.minutes = None
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    train(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
