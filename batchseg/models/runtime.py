"""Per-worker model runtime: injectable builders, a per-process cache, the worker's device, precision.

Each Dask worker process loads each model once and keeps it (DESIGN "Execution");
tests inject tiny builders through ``ModelBuilders``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from batchseg.errors import ModelLoadError
from batchseg.io.store import ModelGeometry
from batchseg.models.clip import ClipSpec, DenseClip, load_dense_clip
from batchseg.models.sam import SamEncoder, SamSpec, load_sam
from batchseg.models.specs import ModelSettings


def build_clip(spec: ClipSpec, canvas: int | None, device: str) -> DenseClip:
    return load_dense_clip(spec, canvas=canvas, device=device)


def build_sam(spec: SamSpec, device: str) -> SamEncoder:
    return SamEncoder(load_sam(spec, device=device)).to(device)


@dataclass(frozen=True)
class ModelBuilders:
    """How models are made; module-level functions so tasks pickle by reference."""

    clip: Callable[[ClipSpec, int | None, str], DenseClip] = build_clip
    sam: Callable[[SamSpec, str], SamEncoder] = build_sam


@dataclass
class LoadedModels:
    clip: DenseClip | None
    sam: SamEncoder | None
    device: str
    precision: str
    clip_fine: DenseClip | None = None  # the same CLIP at the fine canvas (ModelSettings.clip_fine_canvas)

    @property
    def geometry(self) -> ModelGeometry:
        clip, sam, fine = self.clip, self.sam, self.clip_fine
        return ModelGeometry(
            clip_canvas=clip.canvas if clip else None,
            clip_patch=clip.patch if clip else None,
            clip_grid=clip.grid if clip else None,
            clip_dense_dim=clip.dense_dim if clip else None,
            clip_key_dim=clip.key_dim if clip else None,
            clip_kind=clip.kind if clip else None,
            clip_token_dim=clip.token_dim if clip else None,
            clip_token_grid=clip.token_grid if clip else None,
            sam_image_size=sam.image_size if sam else None,
            sam_embed_shape=tuple(sam.embed_shape) if sam else None,
            clip_fine_canvas=fine.canvas if fine else None,
            clip_fine_grid=fine.grid if fine else None,
            clip_fine_token_grid=fine.token_grid if fine else None,
        )

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights and inputs of the forward pass."""
        return PRECISION_DTYPES[self.precision]


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_CACHE: dict[tuple[ModelSettings, ModelBuilders, str], LoadedModels] = {}
_CACHE_LOCK = threading.Lock()


def pick_device() -> str:
    """The process's (pinned) GPU when it sees one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_device() -> str:
    """The device every model and tensor of this worker's tasks goes to.

    Every stage asks here, through this module (``runtime.worker_device()``), and
    nowhere else, so one function decides where a worker computes and a test can swap
    it for a fake device that catches a tensor left behind (tests/fake_device.py).
    """
    return pick_device()


def get_models(settings: ModelSettings, builders: ModelBuilders, device: str | None = None) -> LoadedModels:
    """Load the models of ``settings`` once per process and return the cached set."""
    device = device or worker_device()
    key = (settings, builders, device)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            clip = builders.clip(settings.clip, settings.clip_canvas, device) if settings.clip else None
            fine = _fine_clip(settings, builders, clip, device)
            sam = builders.sam(settings.sam, device) if settings.sam else None
            # Weights are cast to the precision rather than run under autocast: on CPU,
            # autocast sends nn.MultiheadAttention down a path that made ViT-B/16 3.7x
            # slower than fp32, while bf16 weights are 1.4x faster (bench/RESULTS.md).
            for model in (clip, fine, sam):
                if model is not None:
                    model.eval().requires_grad_(False).to(PRECISION_DTYPES[settings.precision])
            cached = LoadedModels(clip=clip, sam=sam, device=device, precision=settings.precision, clip_fine=fine)
            _CACHE.clear()  # a worker serves one build at a time; free the old models
            _CACHE[key] = cached
        return cached


def _fine_clip(settings: ModelSettings, builders: ModelBuilders, clip: DenseClip | None, device: str
               ) -> DenseClip | None:
    """CLIP at the fine canvas: a second copy, since a canvas is set into the model's
    positional embedding (and a CNN tower's pooling) when it loads."""
    if not settings.clip_fine_canvas or clip is None:
        return None
    if settings.clip_fine_canvas <= clip.canvas or settings.clip_fine_canvas % clip.patch:
        raise ModelLoadError(f"--fine-canvas must be a multiple of the CLIP patch size ({clip.patch}) larger than "
                             f"its canvas ({clip.canvas}), got {settings.clip_fine_canvas}")
    return builders.clip(settings.clip, settings.clip_fine_canvas, device)


def set_torch_threads(threads: int | None) -> None:
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
