"""Test support shipped with the package (like ``numpy.testing``).

Tiny random-init models and generated image folders, so tests, examples and
benchmarks run without downloads; and fault injectors that Dask worker processes
can import (they are spawned, so they cannot import the test modules).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from batchseg.config import ModelSettings
from batchseg.models.clip import ClipSpec, DenseClip, DenseClipOutput, save_local_dir, tiny_clip_config
from batchseg.models.dense_heads import ClipTokens
from batchseg.models.runtime import ModelBuilders, build_clip
from batchseg.models.sam import SAM_ARCHS, SamSpec, build_sam_model, save_sam_checkpoint


@dataclass(frozen=True)
class TinyModels:
    clip_dir: Path  # open_clip local-dir folder
    sam_checkpoint: Path  # weights of SAM_ARCHS["tiny"]

    @property
    def clip_option(self) -> str:
        return f"local-dir:{self.clip_dir}"

    def settings(self, canvas: int | None = 64, precision: str = "fp32", sam: bool = True, clip: bool = True,
                 fine_canvas: int = 0) -> ModelSettings:
        return ModelSettings(
            clip=ClipSpec(self.clip_option) if clip else None,
            sam=SamSpec("tiny", str(self.sam_checkpoint)) if sam else None,
            clip_canvas=canvas,
            precision=precision,
            clip_fine_canvas=fine_canvas,
        )


def make_tiny_models(folder: Path, seed: int = 0) -> TinyModels:
    """Random-init tiny CLIP (local-dir) and tiny SAM (safetensors) under ``folder``."""
    folder = Path(folder)
    clip_dir = save_local_dir(tiny_clip_config("vit"), folder / "tiny-clip", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam_model(SAM_ARCHS["tiny"])
    checkpoint = save_sam_checkpoint(sam, folder / "tiny-sam.safetensors")
    return TinyModels(clip_dir=clip_dir, sam_checkpoint=checkpoint)


def write_image_folder(folder: Path, count: int, seed: int = 0, start: int = 0) -> list[Path]:
    """Write ``count`` small non-square images of coloured shapes (PNG and JPEG mixed).

    Image ``start + i`` depends only on (seed, start + i), so folders grown in steps
    equal folders written at once.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        rng = np.random.default_rng([seed, index])
        width, height = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
            x1, y1 = x0 + int(rng.integers(8, 40)), y0 + int(rng.integers(8, 40))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        sub = folder / ("a" if index % 3 == 0 else "b")
        sub.mkdir(exist_ok=True)
        if index % 2:
            path = sub / f"img{index:04d}.jpg"
            image.save(path, quality=90)
        else:
            path = sub / f"img{index:04d}.png"
            image.save(path)
        paths.append(path)
    return paths


_DENSE_CLIP_ATTRIBUTES = (
    "canvas", "patch", "grid", "dense_dim", "key_dim", "mean", "std", "preprocess", "dense_form", "kind", "token_dim",
    "token_grid",
)


def _copy_geometry(wrapper: torch.nn.Module, inner: torch.nn.Module) -> None:
    """Give a DenseClip stand-in the attributes the pipeline reads from a DenseClip."""
    for name in _DENSE_CLIP_ATTRIBUTES:
        if hasattr(inner, name):
            setattr(wrapper, name, getattr(inner, name))


class _KillOnce(torch.nn.Module):
    """A DenseClip stand-in that kills its process at the n-th batch, once per marker."""

    def __init__(self, inner: DenseClip, marker: str, after_batches: int) -> None:
        super().__init__()
        self.inner = inner
        self.marker = marker
        self.after_batches = after_batches
        self.batches = 0
        _copy_geometry(self, inner)

    def forward(self, pixels: torch.Tensor) -> DenseClipOutput:
        self._maybe_die()
        return self.inner(pixels)

    def encode_tokens(self, pixels: torch.Tensor) -> ClipTokens:
        self._maybe_die()
        return self.inner.encode_tokens(pixels)

    def _maybe_die(self) -> None:
        self.batches += 1
        if self.batches >= self.after_batches and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed pid {os.getpid()}\n")
            os._exit(17)  # no cleanup, like SIGKILL or an OOM kill


@dataclass(frozen=True)
class KillOnceClipBuilder:
    """Builds the real CLIP, wrapped so the worker dies mid-shard the first time."""

    marker: str
    after_batches: int = 2

    def __call__(self, spec: ClipSpec, canvas: int | None, device: str) -> torch.nn.Module:
        return _KillOnce(build_clip(spec, canvas, device), self.marker, self.after_batches)


def kill_once_builders(marker: Path, after_batches: int = 2) -> ModelBuilders:
    return ModelBuilders(clip=KillOnceClipBuilder(str(marker), after_batches))


class _Slow(torch.nn.Module):
    """A model stand-in that sleeps before each batch, to make a run slow enough to interrupt."""

    def __init__(self, inner: torch.nn.Module, delay: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay = delay
        _copy_geometry(self, inner)

    def forward(self, pixels: torch.Tensor) -> DenseClipOutput:
        import time

        time.sleep(self.delay)
        return self.inner(pixels)

    def encode_tokens(self, pixels: torch.Tensor) -> ClipTokens:
        import time

        time.sleep(self.delay)
        return self.inner.encode_tokens(pixels)


@dataclass(frozen=True)
class SlowClipBuilder:
    delay: float = 0.3

    def __call__(self, spec: ClipSpec, canvas: int | None, device: str) -> torch.nn.Module:
        return _Slow(build_clip(spec, canvas, device), self.delay)


@dataclass(frozen=True)
class RewriteOnLoadClipBuilder:
    """Builds the real CLIP after rewriting ``path`` with ``data``: the file changes after the
    driver hashed it and before the worker decodes it (the race ``changed`` rows record)."""

    path: str
    data: bytes

    def __call__(self, spec: ClipSpec, canvas: int | None, device: str) -> torch.nn.Module:
        Path(self.path).write_bytes(self.data)
        return build_clip(spec, canvas, device)


def rewrite_on_load_builders(path: Path, data: bytes) -> ModelBuilders:
    return ModelBuilders(clip=RewriteOnLoadClipBuilder(str(path), data))
