"""The students' settings, torch-free: kinds, architectures, optimisation, augmentation, prompts.

The drivers and the pipeline file check these and compare them with what a student
folder was trained with before anything is computed, so a rerun with nothing to do
never imports torch (seconds). The modules that build and train the students
(``semantic``, ``yolact``, ``edgesam``, ``train``, ``data``, ``sam_distill``) re-export them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from batchseg.errors import UsageError
from batchseg.io.statuses import StudentKind

BLOCK_KINDS = ("conv", "attention", "dynamic", "dynamic-dw")
NMS_KINDS = ("fast", "noh")
# CLIP's normalisation: the students see pixels as the teacher did.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
ENCODER_TYPE = "repvit"  # the sam-encoder student's encoder, as its config.json names it
MAX_WIDTH = 2048
MAX_DEPTH = 64


@dataclass(frozen=True)
class SemanticArch:
    """Architecture of a semantic student; stored in its ``config.json``."""

    blocks: str = "conv"
    width: int = 64
    depth: int = 4
    heads: int = 4
    input_size: int = 128  # square input canvas (letterboxed), pixels; a multiple of 8
    temperature: float = 0.07  # cosine similarity / temperature = logits

    def validate(self) -> None:
        if self.blocks not in BLOCK_KINDS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCK_KINDS)}, got {self.blocks!r}")
        if self.input_size < 32 or self.input_size % 8:
            raise ValueError(f"input size must be a multiple of 8 and at least 32, got {self.input_size}")
        if self.width < 8 or self.width % 4 or self.width % self.heads:
            raise ValueError(f"width must be a multiple of 4 and of heads ({self.heads}), at least 8; got {self.width}")
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class YolactArch:
    """Architecture of an instance student; stored in its ``config.json``."""

    blocks: str = "conv"
    width: int = 64
    depth: int = 4
    heads: int = 4
    input_size: int = 128
    prototypes: int = 32
    anchor_scale: float = 3.0  # anchor side = anchor_scale * level stride

    def validate(self) -> None:
        if self.blocks not in BLOCK_KINDS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCK_KINDS)}, got {self.blocks!r}")
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f"an instance student's input size must be a multiple of 32, at least 64; got {self.input_size}")
        if self.width < 8 or self.width % 4 or self.width % self.heads:
            raise ValueError(f"width must be a multiple of 4 and of heads ({self.heads}); got {self.width}")
        if self.prototypes < 1 or self.depth < 1:
            raise ValueError("prototypes and depth must be at least 1")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SamStudentArch:
    """Sizes of the student encoder (the teacher fixes its input canvas and embedding shape)."""

    width: int = 64  # channels of the stride-8 stage
    depth: int = 4  # blocks of the stride-16 stage

    def validate(self) -> None:
        if not 8 <= self.width <= MAX_WIDTH or self.width % 8:
            raise UsageError(f"--width must be a multiple of 8 between 8 and {MAX_WIDTH}, got {self.width}")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise UsageError(f"--depth must be between 1 and {MAX_DEPTH}, got {self.depth}")

    def to_json(self) -> dict:
        return {"type": ENCODER_TYPE, **asdict(self)}


# The architecture settings each student kind takes.
ARCHS = {StudentKind.SEMANTIC: SemanticArch, StudentKind.INSTANCE: YolactArch, StudentKind.SAM_ENCODER: SamStudentArch}


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; part of a student's identity (a change means a new training)."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise UsageError("--weight-decay and warm-up steps must be 0 or more")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Augment:
    """Seeded augmentation; ``scale`` is the jitter range of the letterboxed canvas."""

    flip: bool = True
    scale: tuple[float, float] = (0.75, 1.25)

    def validate(self) -> None:
        low, high = self.scale
        if not 0.1 <= low <= high <= 4.0:
            raise UsageError(f"--scale-jitter must satisfy 0.1 <= low <= high <= 4, got {low}, {high}")


@dataclass(frozen=True)
class PromptSettings:
    """Phase 2's prompt sampling and loss (sam-encoder students)."""

    objects_per_image: int = 8
    refine_iterations: int = 2  # decodes after the first, each adding a point from the error region
    box_share: float = 0.5  # probability that an object is prompted with its box (else a point)
    bce_weight: float = 5.0
    dice_weight: float = 5.0

    def validate(self) -> None:
        if not 1 <= self.objects_per_image <= 256:
            raise UsageError(f"objects per image must be between 1 and 256, got {self.objects_per_image}")
        if not 0 <= self.refine_iterations <= 16:
            raise UsageError(f"refine iterations must be between 0 and 16, got {self.refine_iterations}")
        if not 0.0 <= self.box_share <= 1.0:
            raise UsageError(f"box share must be in [0, 1], got {self.box_share}")

    def to_json(self) -> dict:
        return asdict(self)
