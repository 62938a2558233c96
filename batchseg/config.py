"""Frozen configuration per stage, validated once at the edge and saved next to outputs."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchseg.choices import BACKGROUND, KEY_SMOOTHING, REGION_VOTES, RETRAIN_POLICIES
from batchseg.cluster import ClusterSettings
from batchseg.errors import UsageError
from batchseg.io.hashing import sha256_json
from batchseg.io.images import DEFAULT_MAX_PIXELS
from batchseg.models.specs import PRECISIONS, ClipSpec, DenseHeadSettings, ModelSettings, SamSpec  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from batchseg.labels.settings import ProposalSettings, SelfTrainSettings
    from batchseg.models.vocabulary import Vocabulary

# Upper bounds on counts: far past any real use, low enough that a typo cannot exhaust the machine.
MAX_ROUNDS = 50
MAX_SHARD_SIZE = 100_000
MAX_BATCH_SIZE = 4096
BUILD_FILE = "batchseg.json"
# 2: embed stores last-block tokens (clip_tokens, clip_cls) instead of one head's output.
BUILD_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class EmbedConfig:
    """One `batchseg embed` run."""

    source: Path
    out: Path
    models: ModelSettings
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    batch_size: int = 8
    shard_size: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    verify: bool = False  # read every stored row back, recompute the damaged ones
    repair: bool = False  # move damaged manifest parts to OUT/quarantine/, re-plan what they covered
    # Only files under these folders (inside ``source``) are read; empty: all of ``source``.
    # `batchseg build` with several sources embeds their common parent restricted to them.
    include: tuple[Path, ...] = ()

    def validate(self) -> None:
        for folder in self.include:
            if self.source.resolve() not in (folder.resolve(), *folder.resolve().parents):
                raise UsageError(f"included folder {folder} is not inside the source folder {self.source}")
        validate_image_job(self.source, self.out, "output", self.batch_size, self.shard_size)
        if self.max_pixels < 1:
            raise UsageError("--max-pixels must be at least 1")
        if self.overwrite and (self.verify or self.repair):
            raise UsageError("--overwrite starts over, so there is nothing to --verify or --repair; pass one of them")
        self.models.validate()
        self.cluster.validate()

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "out": str(self.out),
            "models": self.models.to_json(),
            "cluster": asdict(self.cluster),
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
            "max_pixels": self.max_pixels,
            "overwrite": self.overwrite,
            "verify": self.verify,
            "repair": self.repair,
            "include": [str(folder) for folder in self.include],
        }


def validate_image_job(source: Path, dest: Path, dest_name: str, batch_size: int, shard_size: int) -> None:
    """The checks every command that reads an image folder into a new folder shares
    (``embed``, ``predict``): source and destination folders, batch and shard sizes."""
    if not source.exists():
        raise UsageError(f"source folder {source} does not exist")
    if not source.is_dir():
        raise UsageError(f"source {source} is not a folder")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest_name} {dest} exists and is not a folder")
    if dest.resolve() == source.resolve():
        raise UsageError(f"the {dest_name} folder must differ from the source folder")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise UsageError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, got {shard_size}")


def read_build_file(out: Path) -> dict[str, Any] | None:
    path = out / BUILD_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not readable JSON ({exc}); rerun with --overwrite or use a new folder") from None
    if data.get("schema_version") == 1:
        raise UsageError(
            f"{path} is a version-1 build: it stores one dense head's output, while this batchseg stores the "
            "tokens every head is computed from. Re-embed into a new folder (or rerun `batchseg embed SRC "
            f"{out} --overwrite` with the same models); then choose the head at label time with "
            "`pseudolabel --dense-head`"
        )
    if data.get("schema_version") != BUILD_SCHEMA_VERSION:
        raise UsageError(
            f"{path} has schema version {data.get('schema_version')!r}, this batchseg knows "
            f"{BUILD_SCHEMA_VERSION}; rerun with --overwrite or use the batchseg version that wrote it"
        )
    return data


SAM_MODES = ("auto", "on", "off")


def key_smoothing_choice(value: str | None, no_key_smoothing: bool) -> str:
    """``--key-smoothing`` from the option and its older spelling ``--no-key-smoothing`` (= off)."""
    if no_key_smoothing and value not in (None, "off", "auto"):
        raise UsageError(f"--no-key-smoothing contradicts --key-smoothing {value}; give one of them")
    return "off" if no_key_smoothing else (value or "auto")


# The fine-canvas weight a record without "fine_weight" means. Builds labelled before the
# option had no fine canvas, so their records (and the round keys hashed from them) stay
# valid; any other weight, a changed default included, is recorded and so changes the keys.
UNRECORDED_FINE_WEIGHT = 0.5


@dataclass(frozen=True)
class LabelSettings:
    """Everything that changes round 0 (MaskCLIP labels, SAM proposals, recognition)."""

    vocabulary: "Vocabulary"
    templates: tuple[str, ...]
    background: bool = False  # add "background" as a text class
    bg_floor: float | None = None  # pixels whose best probability is below: unlabelled
    key_smoothing: str = "auto"  # KEY_SMOOTHING: auto = only when no SAM masks vote
    prompt_denoising: bool = True
    pd_thresh: float = 0.5
    sam: str = "auto"  # use stored SAM embeddings: auto (when stored), on (required), off
    proposals: "ProposalSettings" = None  # type: ignore[assignment]
    work_max_side: int = 1024  # label maps are made at most this large, then mapped up
    dense_head: DenseHeadSettings = field(default_factory=DenseHeadSettings)
    region_vote: str = "pool"  # measured better than "majority" with the toy CLIP (bench/RESULTS.md, selftrain)
    # A SAM mask recognised as "background" repaints its pixels background. Off: such a
    # mask usually holds an object CLIP's coarse grid half-missed, and repainting erased
    # the object pixels it did get right (bench/RESULTS.md, "SAM's vote").
    bg_mask_vote: bool = False
    # The fine canvas's share of the logits (embed --fine-canvas): 0 ignores its stored tokens.
    fine_weight: float = 0.5

    def validate(self) -> None:
        if self.sam not in SAM_MODES:
            raise UsageError(f"sam must be one of {SAM_MODES}, got {self.sam!r}")
        if self.key_smoothing not in KEY_SMOOTHING:
            raise UsageError(f"--key-smoothing must be one of {', '.join(KEY_SMOOTHING)}, got {self.key_smoothing!r}")
        if self.region_vote not in REGION_VOTES:
            raise UsageError(f"--region-vote must be one of {', '.join(REGION_VOTES)}, got {self.region_vote!r}")
        self.dense_head.validate()
        if not 0.0 <= self.pd_thresh <= 1.0:
            raise UsageError(f"--pd-thresh must be in [0, 1], got {self.pd_thresh}")
        if self.bg_floor is not None and not 0.0 <= self.bg_floor <= 1.0:
            raise UsageError(f"--bg-floor must be in [0, 1], got {self.bg_floor}")
        if self.work_max_side < 16:
            raise UsageError(f"--work-max-side must be at least 16, got {self.work_max_side}")
        if not 0.0 <= self.fine_weight <= 1.0:
            raise UsageError(f"--fine-weight must be in [0, 1], got {self.fine_weight}")

    def smooths_keys(self, sam_votes: bool) -> bool:
        """Whether round 0 applies key smoothing, given whether SAM masks vote the map."""
        return self.key_smoothing == "on" or (self.key_smoothing == "auto" and not sam_votes)

    @property
    def class_names(self) -> tuple[str, ...]:
        names = tuple(self.vocabulary.names)
        return names + (BACKGROUND,) if self.background else names

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": list(self.class_names),
            "synonyms": [list(s) for s in self.vocabulary.synonyms],
            "templates_sha256": sha256_json(list(self.templates)),
            "background": self.background,
            "bg_floor": self.bg_floor,
            "key_smoothing": self.key_smoothing,
            "prompt_denoising": self.prompt_denoising,
            "pd_thresh": self.pd_thresh,
            "sam": self.sam,
            "proposals": asdict(self.proposals) if self.proposals is not None else None,
            "work_max_side": self.work_max_side,
            "dense_head": asdict(self.dense_head),
            "region_vote": self.region_vote,
            "bg_mask_vote": self.bg_mask_vote,
        } | ({} if self.fine_weight == UNRECORDED_FINE_WEIGHT else {"fine_weight": self.fine_weight})


@dataclass(frozen=True)
class PseudolabelConfig:
    """One `batchseg pseudolabel` run."""

    out: Path
    labels: LabelSettings
    selftrain: "SelfTrainSettings"
    rounds: int = 3
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    shard_size: int = 64
    overwrite: bool = False
    include_flagged: bool = False  # label images `batchseg qc` flagged too
    retrain: str = "always"  # rounds >= 1 when images were added: RETRAIN_POLICIES
    retrain_fraction: float = 0.1  # retrain "fraction": added images / images trained on

    def validate(self) -> None:
        if self.retrain not in RETRAIN_POLICIES:
            raise UsageError(f"retrain must be one of {', '.join(RETRAIN_POLICIES)}, got {self.retrain!r}")
        if not 0.0 <= self.retrain_fraction <= 100.0:
            raise UsageError(f"retrain-fraction must be in [0, 100], got {self.retrain_fraction}")
        if not (self.out / BUILD_FILE).exists():
            raise UsageError(
                f"{self.out} is not a batchseg build (no {BUILD_FILE}); run `batchseg embed SRC {self.out}` first"
            )
        if not 0 <= self.rounds <= MAX_ROUNDS:
            raise UsageError(f"--rounds must be between 0 and {MAX_ROUNDS}, got {self.rounds}")
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            raise UsageError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, got {self.shard_size}")
        self.labels.validate()
        self.selftrain.validate()
        self.cluster.validate()

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "labels": self.labels.to_json(),
            "selftrain": asdict(self.selftrain),  # as labels.settings.settings_record
            "rounds": self.rounds,
            "cluster": asdict(self.cluster),
            "shard_size": self.shard_size,
            "overwrite": self.overwrite,
            "include_flagged": self.include_flagged,
            "retrain": self.retrain,
            "retrain_fraction": self.retrain_fraction,
        }


def must_retrain(policy: str, fraction: float, trained_on: int, now: int) -> bool:
    """Whether a head (or student) trained on ``trained_on`` images retrains now that its
    image set changed and holds ``now`` images (``RETRAIN_POLICIES``; removed images
    count as nothing added)."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    return max(0, now - trained_on) > fraction * max(1, trained_on)

