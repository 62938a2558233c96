"""Model specs and model settings: plain data, no torch, no open_clip, no segment-anything.

What a command needs to *plan* (which models a build was made with, whether a rerun's
settings match it, which dense head is asked for) lives here, so the driver can decide
that there is nothing to do, or refuse a mismatch, without importing the heavy model
stack (DESIGN "Layers": models/ and labels/ take these settings as arguments and never
import the stage configs). The modules that load and run the models re-export these
names (``batchseg.models.clip.ClipSpec``, ``batchseg.models.sam.SamSpec``,
``batchseg.models.dense_heads.DenseHeadSettings``, ``batchseg.config.ModelSettings``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchseg.choices import DENSE_HEADS, PRECISIONS, SAM_MODELS
from batchseg.errors import ModelLoadError, UsageError
from batchseg.io.hashing import file_sha256, sha256_bytes

LOCAL_DIR = "local-dir:"
VIT_ONLY_HEADS = ("clearclip", "sclip", "naclip")
SAM_HEADS = ("proxy-sam",)


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load.

    Attributes:
        model: open_clip model name (``"ViT-B-16"``, ``"RN50"``) or ``"local-dir:PATH"``
            (a folder with ``open_clip_config.json`` and a weights file, open_clip's format).
        pretrained: open_clip pretrained tag or a checkpoint file path. ``None`` or
            ``"random"`` = random init; for ``local-dir:`` the folder's weights are
            loaded unless this is ``"random"``.

    The dense head is not part of the spec: ``embed`` stores tokens every head can
    use, and ``pseudolabel --dense-head`` picks one at label time.
    """

    model: str
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ModelLoadError("CLIP model name is empty")


@dataclass(frozen=True)
class SamSpec:
    """Which SAM to load.

    Attributes:
        model: a key of ``SAM_ARCHS``: ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` or ``"tiny"``;
            or the path of a SAM model folder (``batchseg.models.sam_folder``: config
            JSON + safetensors, e.g. a distilled ``sam-encoder`` student), then
            ``checkpoint`` stays ``None``.
        checkpoint: path to a ``.pth``/``.pt`` file (a plain ``state_dict`` as SAM
            ships it) or a ``.safetensors`` file; ``None`` or ``"random"`` gives a
            randomly initialised model (speed benchmarks, tests).
    """

    model: str
    checkpoint: str | None = None


def is_sam_folder(model: str) -> bool:
    """True when ``model`` names a folder rather than a registry arch (registry names win)."""
    return model not in SAM_MODELS and Path(os.path.expanduser(model)).is_dir()


def unknown_sam_message(model: str) -> str:
    valid = ", ".join(sorted(SAM_MODELS))
    if Path(os.path.expanduser(model)).exists():
        return f"SAM model {model!r} is a file, not a SAM model name ({valid}) or a SAM model folder"
    return (f"unknown SAM model {model!r}: not a SAM model name ({valid}) and no such folder "
            "(a SAM model folder holds config.json and model.safetensors)")


def check_sam_spec(spec: SamSpec) -> None:
    """Validate ``spec`` where the user gave it, without reading weights: a registry name, or a
    SAM model folder whose sizes and weight shapes agree (``ModelLoadError`` otherwise)."""
    if spec.model in SAM_MODELS:
        return
    if not is_sam_folder(spec.model):
        raise ModelLoadError(unknown_sam_message(spec.model))
    if spec.checkpoint not in (None, "random"):
        raise ModelLoadError(f"SAM model folder {spec.model} carries its own weights: drop --sam-checkpoint")
    from batchseg.models.sam_folder import inspect_sam_folder

    inspect_sam_folder(Path(spec.model))



@dataclass(frozen=True)
class DenseHeadSettings:
    """Which head, and its published hyper-parameters."""

    name: str = "maskclip"
    naclip_std: float = 5.0  # NACLIP's Gaussian window, in patches
    proxy_beta: float = 1.2  # ProxyCLIP: S <- gamma * (S - beta * mean(S))
    proxy_gamma: float = 3.0
    # SAM's grid is average-pooled to at most this side before the proxy attention: the
    # attention is (side^2)^2, and at SAM ViT's 64 x 64 it costs about one whole CLIP
    # ViT-B/16 forward pass (bench/dense_heads.py); 32 x 32 costs a sixteenth of that.
    proxy_grid: int = 32

    def validate(self) -> None:
        if self.name not in DENSE_HEADS:
            raise UsageError(f"unknown dense head {self.name!r}; choose one of {', '.join(DENSE_HEADS)}")
        for field_name in ("naclip_std", "proxy_gamma"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"{field_name} must be a finite number > 0, got {value!r}")
        if isinstance(self.proxy_grid, bool) or not isinstance(self.proxy_grid, int) or not 1 <= self.proxy_grid <= 256:
            raise UsageError(f"proxy_grid must be an integer in [1, 256], got {self.proxy_grid!r}")
        if not (isinstance(self.proxy_beta, (int, float)) and math.isfinite(self.proxy_beta)):
            raise UsageError(f"proxy_beta must be a finite number, got {self.proxy_beta!r}")

    @property
    def needs_sam(self) -> bool:
        return self.name in SAM_HEADS


def check_head_supported(settings: DenseHeadSettings, kind: str, has_sam: bool) -> None:
    """Raise ``UsageError`` when the head cannot run on this tower kind or build."""
    settings.validate()
    if settings.name in VIT_ONLY_HEADS and kind != "vit":
        raise UsageError(
            f"dense head {settings.name!r} needs a ViT CLIP (this build's CLIP is a {kind} tower); "
            "use maskclip or proxy-sam"
        )
    if settings.needs_sam and not has_sam:
        raise UsageError(
            f"dense head {settings.name!r} uses the stored SAM embeddings, and this build has none "
            "(embed ran with --no-sam, or --no-sam was given); pick another head"
        )


def model_identity(spec: ClipSpec) -> str:
    """What the CLIP *is*, not how its path was spelt: for a ``local-dir:`` folder or a
    checkpoint file, the SHA-256 of its config and weight files (so a model retrained in
    place gets a new key and never reuses stale class embeddings); for a named model with
    a pretrained tag, the name and tag (the tag names fixed weights)."""
    files: list[Path] = []
    if spec.model.startswith(LOCAL_DIR):
        folder = Path(spec.model[len(LOCAL_DIR):]).expanduser()
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    elif spec.pretrained and Path(spec.pretrained).expanduser().is_file():
        files = [Path(spec.pretrained).expanduser()]
    if not files:
        return json.dumps(asdict(spec), sort_keys=True)
    # A named architecture with a checkpoint file: the name matters; a folder: only its files.
    name = b"" if spec.model.startswith(LOCAL_DIR) else spec.model.encode()
    return "sha256:" + sha256_bytes(name, *(path.name.encode() + b"\0" + file_sha256(path).encode() for path in files))


@dataclass(frozen=True)
class ModelSettings:
    """Everything that changes the stored embeddings; a rerun must match it exactly."""

    clip: ClipSpec | None
    sam: SamSpec | None
    clip_canvas: int | None = None  # None: the CLIP model's own image size
    precision: str = "bf16"
    # A second, larger CLIP canvas whose tokens are stored beside the first (0: none). Small
    # objects reach CLIP's training scale there; pseudolabel fuses both canvases' logits.
    clip_fine_canvas: int = 0

    def validate(self) -> None:
        if self.clip is None and self.sam is None:
            raise UsageError("nothing to compute: both CLIP and SAM are switched off")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.clip_canvas is not None and self.clip_canvas < 16:
            raise UsageError(f"--canvas must be at least 16 pixels, got {self.clip_canvas}")
        if self.clip_fine_canvas:
            if self.clip is None:
                raise UsageError("--fine-canvas needs CLIP: leave out --no-clip, or --fine-canvas")
            if self.clip_fine_canvas < 16:
                raise UsageError(f"--fine-canvas must be at least 16 pixels, got {self.clip_fine_canvas}; 0 switches it off")
            if self.clip_canvas is not None and self.clip_fine_canvas <= self.clip_canvas:
                raise UsageError(f"--fine-canvas must be larger than --canvas ({self.clip_canvas}), "
                                 f"got {self.clip_fine_canvas}; 0 switches it off")
        if self.sam is not None:
            check_sam_spec(self.sam)

    def resolved(self) -> "ModelSettings":
        """The same settings with every model path made absolute (how a path was spelt,
        relative or through a symlink, must not make the same model look different)."""
        clip, sam = self.clip, self.sam
        if clip is not None:
            model = clip.model
            if model.startswith(LOCAL_DIR):
                model = LOCAL_DIR + str(Path(model[len(LOCAL_DIR):]).expanduser().resolve())
            pretrained = clip.pretrained
            if pretrained and Path(pretrained).expanduser().exists():
                pretrained = str(Path(pretrained).expanduser().resolve())
            clip = ClipSpec(model, pretrained)
        if sam is not None and sam.checkpoint and Path(sam.checkpoint).expanduser().exists():
            sam = SamSpec(sam.model, str(Path(sam.checkpoint).expanduser().resolve()))
        if sam is not None and is_sam_folder(sam.model):
            sam = SamSpec(str(Path(sam.model).expanduser().resolve()), sam.checkpoint)
        return dataclasses.replace(self, clip=clip, sam=sam)

    def weights_sha256(self) -> dict[str, str | None]:
        """SHA-256 of the CLIP and SAM weight files (None for named or random weights): a
        model retrained in place at the same path is a different model."""
        sam = self.sam.checkpoint if self.sam and self.sam.checkpoint else None
        if self.sam is not None and is_sam_folder(self.sam.model):
            from batchseg.models.sam_folder import sam_folder_identity

            sam_identity: str | None = sam_folder_identity(Path(self.sam.model))
        else:
            sam_identity = file_sha256(sam) if sam and Path(sam).is_file() else None
        return {
            "clip": model_identity(self.clip) if self.clip else None,
            "sam": sam_identity,
        }

    def to_json(self) -> dict[str, Any]:
        # Without a fine canvas the record is what builds before it wrote: keys hashed from it stay valid.
        return {
            "clip": asdict(self.clip) if self.clip else None,
            "sam": asdict(self.sam) if self.sam else None,
            "clip_canvas": self.clip_canvas,
            "precision": self.precision,
            "weights_sha256": self.weights_sha256(),
        } | ({"clip_fine_canvas": self.clip_fine_canvas} if self.clip_fine_canvas else {})

    def differences(self, stored: dict[str, Any], stored_canvas: int | None) -> list[str]:
        """Human-readable differences between these settings and a build's stored ones.

        Models are compared by resolved path and by the weights' content hash."""
        mine = self.resolved().to_json()
        diffs = []
        for key in ("clip", "sam", "precision", "weights_sha256"):
            if key == "weights_sha256" and key not in stored:
                continue  # recorded by builds since the content-hash identity; paths still compared
            if mine[key] != stored.get(key):
                diffs.append(f"{key}: stored {json.dumps(stored.get(key))}, requested {json.dumps(mine[key])}")
        if self.clip_canvas is not None and stored_canvas is not None and self.clip_canvas != stored_canvas:
            diffs.append(f"canvas: stored {stored_canvas}, requested {self.clip_canvas}")
        stored_fine = stored.get("clip_fine_canvas", 0)  # builds made before it have none
        if self.clip_fine_canvas != stored_fine:
            diffs.append(f"fine canvas: stored {stored_fine or 'none'}, requested {self.clip_fine_canvas or 'none'}")
        return diffs

