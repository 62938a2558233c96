"""Settings of the labelling steps (SAM proposals, self-training): plain data, no torch.

The pseudolabel driver builds, validates and records these, and keys its rounds on
them, before deciding whether any work is left; the modules that run the steps
(:mod:`batchseg.labels.proposals`, :mod:`batchseg.labels.selftrain`) take them as
arguments and re-export them.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from batchseg.errors import UsageError

NmsKind = Literal["fast", "torchvision"]

MAX_POINTS_PER_SIDE = 256  # 65,536 prompts per image: far past any useful density


@dataclass(frozen=True)
class ProposalSettings:
    """Everything-mode settings; names and defaults are SAM's (``SamAutomaticMaskGenerator``).

    Attributes:
        points_per_side: the prompt grid has ``points_per_side**2`` points.
        points_per_batch: points decoded together (each gives 3 masks); a memory /
            speed knob. Batched matmuls round differently for different batch
            sizes (seen: predicted IoUs differing by 1 ulp), so use the same value
            as SAM's generator to reproduce its output bit for bit.
        pred_iou_thresh: keep masks whose predicted IoU is ``>`` this; ``<= 0``
            disables the filter (SAM's rule).
        stability_score_thresh: keep masks whose stability score is ``>=`` this;
            ``<= 0`` disables the filter (SAM's rule).
        stability_score_offset: logit offset of the stability score: IoU of the masks
            ``logits > t + offset`` and ``logits > t - offset`` (``t`` = ``sam.mask_threshold``).
        box_nms_thresh: boxes overlapping a higher-scored one with IoU ``>`` this are
            removed.
        min_mask_region_area: must be 0. Kept so settings mirror SAM's names; SAM's
            hole/island removal needs OpenCV, which batchseg does not depend on.
            There are no crop layers either (SAM's ``crop_n_layers=0``).
        nms: ``"fast"`` (our Fast NMS on boxes, the pipeline default) or
            ``"torchvision"`` (SAM's ``batched_nms``: results equal SAM's).
        mask_nms_thresh: after box NMS, drop a mask whose mask IoU (on the decoder's
            low-resolution grid) with a higher-scored kept mask is ``>`` this; ``None``
            skips it (SAM's behaviour). Box NMS alone misses duplicates whose boxes
            disagree: a mask with a few stray pixels far from the object has a box
            much larger than its twin's (seen with the toy SAM: 273 pairs of kept
            masks with mask IoU > 0.7 in 200 images, 45% of all kept masks).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    nms: NmsKind = "fast"
    mask_nms_thresh: float | None = 0.7

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.points_per_side > MAX_POINTS_PER_SIDE:
            raise ValueError(f"points_per_side must be at most {MAX_POINTS_PER_SIDE}, got {self.points_per_side}")
        if self.points_per_side < 1:
            problems.append(f"points_per_side must be >= 1, got {self.points_per_side}")
        if self.points_per_batch < 1:
            problems.append(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if not self.stability_score_offset >= 0:  # also rejects NaN
            problems.append(f"stability_score_offset must be >= 0, got {self.stability_score_offset}")
        if not self.box_nms_thresh >= 0:
            problems.append(f"box_nms_thresh must be >= 0, got {self.box_nms_thresh}")
        if self.min_mask_region_area != 0:
            problems.append(
                "min_mask_region_area must be 0: SAM's small-region removal needs OpenCV, "
                "which batchseg does not use"
            )
        if self.mask_nms_thresh is not None and not self.mask_nms_thresh >= 0:
            problems.append(f"mask_nms_thresh must be >= 0 or None, got {self.mask_nms_thresh}")
        if self.nms not in ("fast", "torchvision"):
            problems.append(f"nms must be 'fast' or 'torchvision', got {self.nms!r}")
        if problems:
            raise ValueError("invalid ProposalSettings: " + "; ".join(problems))


@dataclass(frozen=True)
class SelfTrainSettings:
    """Hyper-parameters of one self-training round (recorded with the round)."""

    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 128
    temperature: float = 50.0  # logits = temperature * cos(head embedding, text classifier)
    seed: int = 0
    conf_thresh: float = 0.5  # used by callers to build targets; stored so it is recorded with the round
    # Class weights (pixel frequency)^-class_balance in the loss; 0 = plain cross-entropy.
    # Without it the head drops rare classes: pseudo labels are mostly background.
    class_balance: float = 0.5
    # Per-class thresholds: a class keeps at least its most confident (1 - class_quantile)
    # share of pixels even when they fall below conf_thresh, so classes the teacher is
    # never sure about still have targets (None: conf_thresh alone).
    class_quantile: float | None = 0.5
    # MaskCLIP+'s schedule: rounds 1..teacher_rounds learn from round 0 (the labeller),
    # later rounds from the round before.
    teacher_rounds: int = 1
    warm_start: bool = True  # a round starts from the previous round's head, not from MaskCLIP
    ema_decay: float | None = 0.99  # the saved head is the exponential moving average of the steps
    # Stop when a round agrees with the one before on at least this share of cells (None: never).
    stop_agreement: float | None = 0.95
    # A round that learns from round k-1 (> 0) ignores the cells where round k-1 left round 0's
    # label: teaching a round's own guesses to the next is how the rounds drifted
    # (bench/RESULTS.md, "self-training rounds": round 2 fell 2.2 points without it).
    anchor: bool = True
    # Keep the better round: a round (>= 2) that agrees with round 0 on the labeller's most
    # confident cells by more than this less than the round before did has drifted; its
    # labels are set aside and the round before's are the result (1: keep every round).
    # 0: a later round must keep at least as many of those cells as the round before
    # (bench/RESULTS.md, "Which later rounds to keep": 0.002 kept rounds that lost up to 1.0).
    drift_tolerance: float = 0.0
    # A round's labels come from the mean of the probabilities of its head and every earlier
    # round's (a temporal ensemble): each head re-fits its targets with noise of its own.
    ensemble: bool = True

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first bad field, its value and what is allowed."""
        for name, most in (("epochs", 10_000), ("batch_size", 4096), ("hidden", 8192)):
            value = getattr(self, name)
            # bool is an int subclass; True as "1 epoch" is a mistake, not a value.
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise UsageError(f"self-training {name} must be an integer in [1, {most}], got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise UsageError(f"self-training seed must be an integer in [0, 2**63), got {self.seed!r}")
        checks: list[tuple[str, Callable[[float], bool], str]] = [
            ("lr", lambda v: v > 0, "a finite number > 0"),
            ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
            ("temperature", lambda v: v > 0, "a finite number > 0"),
            ("conf_thresh", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            ("class_balance", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            ("drift_tolerance", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        ]
        if not isinstance(self.teacher_rounds, int) or isinstance(self.teacher_rounds, bool) or self.teacher_rounds < 1:
            raise UsageError(f"self-training teacher_rounds must be an integer >= 1, got {self.teacher_rounds!r}")
        for name in ("warm_start", "anchor", "ensemble"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"self-training {name} must be true or false, got {getattr(self, name)!r}")
        optional = [
            ("class_quantile", lambda v: 0 <= v < 1, "a number in [0, 1) or None"),
            ("ema_decay", lambda v: 0 <= v < 1, "a number in [0, 1) or None"),
            ("stop_agreement", lambda v: 0 < v <= 1, "a number in (0, 1] or None"),
        ]
        checks += [c for c in optional if getattr(self, c[0]) is not None]
        for name, ok, allowed in checks:
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or not ok(value)
            ):
                raise UsageError(f"self-training {name} must be {allowed}, got {value!r}")


def settings_record(settings: SelfTrainSettings) -> dict[str, Any]:
    """Settings as a plain JSON-ready dict, for the round's run record."""
    return asdict(settings)
