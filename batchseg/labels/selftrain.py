"""MaskCLIP+ self-training: a light open-vocabulary head on stored features.

``batchseg pseudolabel --rounds N`` makes MaskCLIP labels (round 0), then each round
``k`` trains a :class:`SegHead` on round ``k-1``'s confident pixels and predicts every
image to make round ``k`` (MaskCLIP+/DenseCLIP+ self-training, DESIGN.md). The head
reads only what ``embed`` stored per image, never the images:

* ``sam``: ``(Cs, G, G)`` SAM image embedding, optional;
* ``clip``: ``(D, g, g)`` dense MaskCLIP features, always present.

Both lie on the same top-left-anchored square canvas, so bilinear resizing (with
``align_corners=False``: pixel centres) of the clip grid to ``G x G`` aligns them. The
output grid is ``G`` (the SAM grid when SAM is present, else the clip grid ``g``).

The classifier is the *frozen* text-embedding matrix ``(C, D)``: the head maps each
position to a unit vector in CLIP's joint space and scores it by cosine against the
class texts, so its weights do not depend on the vocabulary (a saved head can be
loaded with another classifier of the same ``D``).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchseg.errors import ModelLoadError
from batchseg.io.files import atomic_path, write_json_atomic
from batchseg.labels.settings import SelfTrainSettings, settings_record  # noqa: F401  (torch-free home; re-exported)

HEAD_FORMAT = "batchseg.selftrain.SegHead"
HEAD_VERSION = 1


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: per-image statistics, so results do not depend on
    # batch size or train/eval mode, and a batch of one image trains fine.
    return nn.GroupNorm(math.gcd(channels, 32), channels)


class SegHead(nn.Module):
    """Per-pixel embedding head scored against a frozen text classifier.

    Layout: per-branch 1x1 conv (clip projected at ``g`` then bilinearly resized to
    ``G``; the two commute) + GroupNorm, summed, GELU; one residual 3x3 conv block;
    1x1 conv to ``D``. With ``clip_residual`` the normalised clip features are added
    to that output and the last conv starts at zero, so an untrained head scores
    exactly like raw MaskCLIP (``temperature * cos(clip, text)``) and training
    learns a correction: round 1 starts from the teacher, not from noise.
    """

    classifier: Tensor

    def __init__(
        self,
        classifier: Tensor,
        sam_channels: int | None,
        clip_channels: int,
        hidden: int,
        temperature: float,
        *,
        clip_residual: bool = True,
        seed: int | None = None,
    ) -> None:
        """Args:
            classifier: ``(C, D)`` text embeddings (rows re-normalised to unit length,
                stored as a float32 buffer, never trained or saved with the head).
            sam_channels: ``Cs``, or ``None`` for a head without the SAM branch.
            clip_channels: channels of the dense clip features.
            hidden: width of the fused feature map.
            temperature: logit scale on the cosine.
            clip_residual: add the normalised clip features in embedding space (needs
                ``clip_channels == D``).
            seed: if given, parameters are initialised from this seed without touching
                the global RNG (reproducible heads); otherwise from the global RNG.
        """
        super().__init__()
        if classifier.ndim != 2:
            raise ValueError(f"classifier must be (C, D), got shape {tuple(classifier.shape)}")
        dim = int(classifier.shape[1])
        if clip_residual and clip_channels != dim:
            raise ValueError(f"clip_residual needs clip_channels == D, got {clip_channels} and {dim}")
        self.sam_channels = sam_channels
        self.clip_channels = clip_channels
        self.hidden = hidden
        self.temperature = float(temperature)
        self.clip_residual = clip_residual
        # Non-persistent buffer: moves with .to(device), is not a parameter (so the
        # optimiser never sees it) and is not in state_dict (the vocabulary is not
        # part of the head; load_head takes it as an argument).
        text = F.normalize(classifier.detach().float(), dim=1).clone()
        self.register_buffer("classifier", text, persistent=False)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.sam_proj: nn.Sequential | None = None
            if sam_channels is not None:
                self.sam_proj = nn.Sequential(nn.Conv2d(sam_channels, hidden, 1), _norm(hidden))
            self.clip_proj = nn.Conv2d(clip_channels, hidden, 1)
            self.clip_norm = _norm(hidden)
            self.block = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), _norm(hidden), nn.GELU())
            self.out = nn.Conv2d(hidden, dim, 1)
        if clip_residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    @property
    def embed_dim(self) -> int:
        return int(self.classifier.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[0])

    @staticmethod
    def grid(sam_shape: tuple[int, ...] | torch.Size | None, clip_shape: tuple[int, ...] | torch.Size) -> int:
        """Output grid side ``G``: SAM's grid if SAM is present, else the clip grid."""
        shape = clip_shape if sam_shape is None else sam_shape
        if shape[-1] != shape[-2]:
            raise ValueError(f"features must be on a square grid, got {tuple(shape)}")
        return int(shape[-1])

    def forward(self, sam: Tensor | None, clip: Tensor) -> Tensor:
        """Args:
            sam: ``(B, Cs, G, G)`` any float dtype, or ``None`` for a head without SAM.
            clip: ``(B, Dc, g, g)`` any float dtype.

        Returns:
            float32 logits ``(B, C, G, G)`` in ``[-temperature, temperature]``.
        """
        if (sam is None) != (self.sam_proj is None):
            raise ValueError(
                "this head was built "
                + ("without" if self.sam_proj is None else "with")
                + " a SAM branch but was called "
                + ("with" if sam is not None else "without")
                + " SAM features"
            )
        if clip.ndim != 4 or clip.shape[1] != self.clip_channels:
            raise ValueError(f"clip must be (B, {self.clip_channels}, g, g), got {tuple(clip.shape)}")
        device = self.classifier.device
        clip = clip.to(device=device, dtype=torch.float32)  # stored features may be float16
        size = SegHead.grid(None if sam is None else sam.shape, clip.shape)
        x = self.clip_norm(_resize(self.clip_proj(clip), size))
        if sam is not None and self.sam_proj is not None:
            if sam.ndim != 4 or sam.shape[1] != self.sam_channels or sam.shape[0] != clip.shape[0]:
                raise ValueError(
                    f"sam must be ({clip.shape[0]}, {self.sam_channels}, G, G), got {tuple(sam.shape)}"
                )
            x = x + self.sam_proj(sam.to(device=device, dtype=torch.float32))
        x = F.gelu(x)
        x = x + self.block(x)
        emb = self.out(x)
        if self.clip_residual:
            emb = emb + F.normalize(_resize(clip, size), dim=1)
        emb = F.normalize(emb, dim=1)
        return torch.einsum("bdhw,cd->bchw", emb, self.classifier) * self.temperature


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of ``(B, K, h, w)`` to ``size x size``; a no-op when already there."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@dataclass
class TrainReport:
    """What :func:`train_head` did.

    ``losses``: per epoch, the pixel-weighted mean cross-entropy over the labelled
    pixels (``nan`` for an epoch with none); ``steps``: optimiser steps taken;
    ``pixels_used``: labelled pixels summed over all steps and epochs.
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    pixels_used: int = 0


def balanced_class_weights(counts: Tensor | np.ndarray, power: float) -> Tensor:
    """Loss weight per class: ``count ** -power``, scaled so the pixel-weighted mean is 1.

    Args:
        counts: ``(C,)`` non-negative target pixel counts per class.
        power: 0 gives all ones (plain cross-entropy); 1 gives inverse frequency
            (every class present weighs the same in total).

    Returns:
        float32 ``(C,)``; classes with no pixels get 0 (they are never a target).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or bool((counts < 0).any()):
        raise ValueError(f"counts must be (C,) and non-negative, got {tuple(counts.shape)}")
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present] ** -power
    total = float(counts.sum())
    if total > 0:
        weights *= total / float((weights * counts).sum())
    return weights.float()


def train_head(
    head: SegHead,
    batches: Callable[[int], Iterable[tuple[Tensor | None, Tensor, Tensor]]],
    settings: SelfTrainSettings,
    progress: Callable[[int, float], None] | None = None,
    class_weights: Tensor | None = None,
) -> TrainReport:
    """Train ``head`` in place with AdamW and cross-entropy (``ignore_index=-1``).

    Args:
        head: on the device to train on; inputs are moved there.
        batches: ``batches(epoch)`` yields ``(sam (B,Cs,G,G) | None, clip (B,D,g,g),
            target (B,G,G) integer ids in [0, C) or -1 = ignore)``; features may be
            float16. The caller shuffles (deterministically per epoch).
        settings: validated here; ``epochs``, ``lr``, ``weight_decay``, ``seed`` and
            ``ema_decay`` are used (with ``ema_decay`` the head ends as the exponential
            moving average of its weights over the steps, a steadier teacher).
        progress: called as ``progress(epoch, mean_loss)`` after each epoch.
        class_weights: optional ``(C,)`` loss weight per class (see
            :func:`balanced_class_weights`); ``None`` weighs every pixel the same.

    A batch without a labelled pixel is skipped entirely (no optimiser step), so it
    cannot move the weights through AdamW's momentum or weight decay. The global RNG
    is seeded from ``settings.seed`` inside a forked RNG state, so runs are
    reproducible and the caller's RNG is left as it was.
    """
    settings.validate()
    params = [p for p in head.parameters() if p.requires_grad]
    device = head.classifier.device
    report = TrainReport()
    start = time.perf_counter()
    was_training = head.training
    cuda = [device.index or 0] if device.type == "cuda" else []
    weight = None
    if class_weights is not None:
        if tuple(class_weights.shape) != (head.num_classes,):
            raise ValueError(f"class_weights must be ({head.num_classes},), got {tuple(class_weights.shape)}")
        weight = class_weights.to(device=device, dtype=torch.float32)
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(settings.seed)
        optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        ema = [p.detach().clone() for p in params] if settings.ema_decay is not None else None
        head.train()
        for epoch in range(settings.epochs):
            loss_sum, pixel_sum = 0.0, 0
            for sam, clip, target in batches(epoch):
                target = _check_target(target, head, sam, clip).to(device)
                valid = int((target >= 0).sum())
                if valid == 0:
                    continue
                logits = head(sam, clip)
                loss = F.cross_entropy(logits, target, weight=weight, ignore_index=-1)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if ema is not None:
                    # Warm-up of the decay (as timm's ModelEmaV2 with warmup): early steps move
                    # the average more, so short runs still end near the trained weights.
                    decay = min(settings.ema_decay, (1 + report.steps) / (10 + report.steps))
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
                report.steps += 1
                report.pixels_used += valid
                loss_sum += float(loss.detach()) * valid  # pixel-weighted: batches differ in labelled pixels
                pixel_sum += valid
            mean = loss_sum / pixel_sum if pixel_sum else float("nan")
            report.losses.append(mean)
            if progress is not None:
                progress(epoch, mean)
        if ema is not None and report.steps:
            with torch.no_grad():
                for p, averaged in zip(params, ema):
                    p.copy_(averaged)
    head.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def _check_target(target: Tensor, head: SegHead, sam: Tensor | None, clip: Tensor) -> Tensor:
    """Validate a ``(B, G, G)`` target against the head and features; return it as int64."""
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    size = SegHead.grid(None if sam is None else sam.shape, clip.shape)
    if tuple(target.shape) != (clip.shape[0], size, size):
        raise ValueError(f"target must be ({clip.shape[0]}, {size}, {size}), got {tuple(target.shape)}")
    target = target.long()
    # Checked here because an out-of-range id is a device-side assert on CUDA.
    if target.numel() and (int(target.min()) < -1 or int(target.max()) >= head.num_classes):
        raise ValueError(
            f"target ids must be -1 (ignore) or in [0, {head.num_classes}), "
            f"got range [{int(target.min())}, {int(target.max())}]"
        )
    return target


def predict_probs(head: SegHead, sam: Tensor | None, clip: Tensor) -> Tensor:
    """Class probabilities, float32 ``(B, C, G, G)`` in ``[0, 1]`` summing to 1 over C.

    Runs in eval mode without autograd; the result is on the head's device.
    """
    was_training = head.training
    head.eval()
    try:
        with torch.inference_mode():
            return torch.softmax(head(sam, clip), dim=1)
    finally:
        head.train(was_training)


def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_head(head: SegHead, path: str | os.PathLike[str]) -> Path:
    """Write the weights to ``path`` (safetensors) and the config to ``path`` with ``.json``.

    The classifier is not saved (see :class:`SegHead`). Both files are written under
    temporary names and renamed; the config goes last, so a crash leaves no config
    and :func:`load_head` refuses the pair instead of reading half a head.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "format": HEAD_FORMAT,
        "version": HEAD_VERSION,
        "sam_channels": head.sam_channels,
        "clip_channels": head.clip_channels,
        "hidden": head.hidden,
        "temperature": head.temperature,
        "clip_residual": head.clip_residual,
        "embed_dim": head.embed_dim,
        "num_classes": head.num_classes,  # informational: any vocabulary of width embed_dim loads
    }
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(_config_path(path), config)
    return path


def load_head(path: str | os.PathLike[str], classifier: Tensor) -> SegHead:
    """Rebuild a head saved by :func:`save_head`, scoring against ``classifier`` ``(C, D)``.

    Raises ``ModelLoadError`` (a ``UsageError``) for a missing, corrupt or
    incompatible head, including a classifier whose ``D`` differs from the head's.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_path = _config_path(path)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read self-training head config {config_path}: {exc}") from None
    ident = (config.get("format"), config.get("version")) if isinstance(config, dict) else None
    if ident != (HEAD_FORMAT, HEAD_VERSION):
        raise ModelLoadError(f"{config_path} is not a version-{HEAD_VERSION} {HEAD_FORMAT} config")
    if classifier.ndim != 2 or classifier.shape[1] != config["embed_dim"]:
        raise ModelLoadError(
            f"head {path} scores {config['embed_dim']}-dim embeddings, "
            f"got a classifier of shape {tuple(classifier.shape)}"
        )
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own Rust-side error types
        raise ModelLoadError(f"cannot read self-training head weights {path}: {exc}") from exc
    head = SegHead(
        classifier,
        config["sam_channels"],
        config["clip_channels"],
        config["hidden"],
        config["temperature"],
        clip_residual=config["clip_residual"],
    )
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights {path} do not match config {config_path}: {exc}") from exc
    return head
