"""`train-student`'s options as a user spells them, and the run config they become.

The command line (``batchseg train-student OUT --name s --width 32``) and a pipeline
file's ``train-student:`` items (``width: 32``) name the same options; both fill a
:class:`TrainStudentOptions` and turn it into a :class:`TrainStudentConfig` here, so a
default or a conversion (``--no-flip``, the ``--scale-jitter`` pair, the ``--classes``
list, which architecture a ``--kind`` takes) cannot differ between the two.

:class:`TrainStudentConfig` lives here rather than in ``stages.train_student`` (which
re-exports it) so that the CLI reads its defaults at import without loading pyarrow
and the training driver. The options take every default from it or from the settings
it holds (``SemanticArch``, ``TrainSettings``, ``Augment``): one copy of each.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

from batchseg.cluster import ClusterSettings
from batchseg.errors import UsageError
from batchseg.io.statuses import AUTO_SOURCE, TRAIN_SOURCES, StudentKind
from batchseg.students.settings import (
    ARCHS, NMS_KINDS, Augment, PromptSettings, SamStudentArch, SemanticArch, TrainSettings, YolactArch,
)

# Options that --kind sam-encoder refuses when given: the teacher SAM fixes its canvas and output.
SAM_ENCODER_FIXED = ("input_size", "blocks", "classes", "nms", "nms_thresh")
CLASSES_EMPTY = "is empty: give at least one class name"


@dataclass(frozen=True)
class TrainStudentConfig:
    """One `batchseg train-student` run."""

    out: Path
    name: str
    kind: StudentKind = StudentKind.SEMANTIC
    round: int | None = None  # None: the last round with labels
    source: str = AUTO_SOURCE  # a LabelSource, or auto: the first of SOURCE_PREFERENCE the round has
    classes: tuple[str, ...] | None = None  # None: every class of the build's vocabulary
    # A row's score is its segment's mean confidence, lower than the per-pixel confidence
    # self-training thresholds at 0.5: at 0.5, 2/3 of the toy teacher's object pixels were
    # dropped and the student learnt background (bench/RESULTS.md, students).
    conf_thresh: float = 0.3
    class_balance: float = 0.5  # semantic: loss weight per class = (pixel frequency)^-this
    arch: SemanticArch | YolactArch | SamStudentArch = field(default_factory=SemanticArch)
    nms: str = "fast"  # instance students: the NMS predict uses (fast, or noh for NOH-NMS)
    nms_thresh: float = 0.5
    train: TrainSettings = field(default_factory=TrainSettings)
    augment: Augment = field(default_factory=Augment)
    images: Path | None = None  # where the images are now, when not where embed read them
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    overwrite: bool = False
    include_flagged: bool = False  # learn from images `batchseg qc` flagged too
    # sam-encoder: the last N epochs are prompt-in-the-loop (phase 2); None: a quarter of them (at least 1)
    prompt_epochs: int | None = None
    prompts: PromptSettings = field(default_factory=PromptSettings)

    @property
    def phase2_epochs(self) -> int:
        if self.prompt_epochs is not None:
            return self.prompt_epochs
        return max(1, self.train.epochs // 4) if self.train.epochs > 1 else 0

    def validate(self) -> None:
        if not self.out.is_dir():
            raise UsageError(f"output folder {self.out} does not exist; run `batchseg embed SRC {self.out}` first")
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith((".", "_")):
            raise UsageError(f"--name must be a plain folder name (no slashes, not starting with . or _), got {self.name!r}")
        if self.kind not in tuple(StudentKind):
            raise UsageError(f"--kind must be one of {', '.join(StudentKind)}, got {self.kind!r}")
        if self.round is not None and self.round < 0:
            raise UsageError(f"--round must be 0 or more, got {self.round}")
        if self.source not in TRAIN_SOURCES:
            raise UsageError(f"--source must be one of {', '.join(TRAIN_SOURCES)}, got {self.source!r}")
        if not 0.0 <= self.class_balance <= 1.0:
            raise UsageError(f"--class-balance must be in [0, 1], got {self.class_balance}")
        if not 0.0 <= self.conf_thresh <= 1.0:
            raise UsageError(f"--conf-thresh must be in [0, 1], got {self.conf_thresh}")
        wanted = ARCHS[self.kind]
        if type(self.arch) is not wanted:
            raise UsageError(f"a {self.kind} student needs a {wanted.__name__}")
        if self.kind != StudentKind.SAM_ENCODER and self.prompt_epochs is not None:
            raise UsageError("--prompt-epochs applies to --kind sam-encoder only")
        if self.prompt_epochs is not None and not 0 <= self.prompt_epochs <= self.train.epochs:
            raise UsageError(f"--prompt-epochs must be between 0 and --epochs ({self.train.epochs}), "
                             f"got {self.prompt_epochs}")
        if self.nms not in NMS_KINDS:
            raise UsageError(f"--nms must be one of {', '.join(NMS_KINDS)}, got {self.nms!r}")
        if not 0.0 <= self.nms_thresh <= 1.0:
            raise UsageError(f"--nms-thresh must be in [0, 1], got {self.nms_thresh}")
        if self.images is not None and not self.images.is_dir():
            raise UsageError(f"--images {self.images} is not a folder")
        try:
            self.arch.validate()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.train.validate()
        self.augment.validate()
        self.prompts.validate()
        self.cluster.validate()

    def identity(self) -> dict:
        """What decides the trained weights; a rerun with other values is another training."""
        if self.kind == StudentKind.SAM_ENCODER:
            return {"kind": self.kind, "round": self.round, "source": self.source,
                    "architecture": self.arch.to_json(), "train": self.train.to_json(),
                    "prompt_epochs": self.phase2_epochs, "prompts": self.prompts.to_json()}
        return {"kind": self.kind, "round": self.round, "source": self.source,
                "classes": list(self.classes) if self.classes else None, "conf_thresh": self.conf_thresh,
                "class_balance": self.class_balance, "architecture": self.arch.to_json(),
                "train": self.train.to_json(), "augment": asdict(self.augment)}

    def to_json(self) -> dict:
        """The run's settings as its run record keeps them."""
        return {**self.identity(), "out": str(self.out), "name": self.name,
                "images": str(self.images) if self.images else None, "cluster": asdict(self.cluster)}


@dataclass(frozen=True)
class TrainStudentOptions:
    """Every `train-student` option but OUT and ``--name`` (the student's identity) and the
    run's handling (``--overwrite``, the cluster), under its Python name (``--conf-thresh``
    is ``conf_thresh``). Values are as given; :meth:`config` converts them."""

    kind: str = TrainStudentConfig.kind.value
    round: int | None = TrainStudentConfig.round
    source: str = TrainStudentConfig.source
    classes: str | tuple[str, ...] | None = TrainStudentConfig.classes  # "a,b" (CLI) or ("a", "b,c") (file)
    conf_thresh: float = TrainStudentConfig.conf_thresh
    class_balance: float = TrainStudentConfig.class_balance
    blocks: str = SemanticArch.blocks
    width: int = SemanticArch.width
    depth: int = SemanticArch.depth
    input_size: int = SemanticArch.input_size
    nms: str = TrainStudentConfig.nms
    nms_thresh: float = TrainStudentConfig.nms_thresh
    epochs: int = TrainSettings.epochs
    prompt_epochs: int | None = TrainStudentConfig.prompt_epochs
    batch_size: int = TrainSettings.batch_size
    lr: float = TrainSettings.lr
    seed: int = TrainSettings.seed
    no_flip: bool = not Augment.flip
    scale_jitter: tuple[float, float] = Augment.scale
    images: Path | None = TrainStudentConfig.images
    include_flagged: bool = TrainStudentConfig.include_flagged

    def class_subset(self) -> tuple[str, ...] | None:
        """The classes to learn, split on commas (``None``: all of the build's); ``UsageError``
        when the option is given but names none."""
        if self.classes is None:
            return None
        items = (self.classes,) if isinstance(self.classes, str) else self.classes
        chosen = tuple(c.strip() for item in items for c in item.split(",") if c.strip())
        if not chosen:
            raise UsageError(f"--classes {CLASSES_EMPTY}")
        return chosen

    def arch(self, given: Collection[str] = ()) -> SemanticArch | YolactArch | SamStudentArch:
        """The architecture ``kind`` takes. ``given`` names the options the user set; a
        sam-encoder refuses those its teacher fixes rather than silently ignoring them."""
        if self.kind == StudentKind.SAM_ENCODER:
            for option in SAM_ENCODER_FIXED:
                if option in given:
                    raise UsageError(f"--{option.replace('_', '-')} does not apply to --kind sam-encoder (the "
                                     "teacher SAM fixes its canvas and output)")
            return SamStudentArch(width=self.width, depth=self.depth)
        return (YolactArch if self.kind == StudentKind.INSTANCE else SemanticArch)(
            blocks=self.blocks, width=self.width, depth=self.depth, input_size=self.input_size)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def augment(self) -> Augment:
        return Augment(flip=not self.no_flip, scale=tuple(self.scale_jitter))

    def config(self, out: Path, name: str, cluster: ClusterSettings, *, given: Collection[str] = (),
               overwrite: bool = False) -> TrainStudentConfig:
        """The run's config; ``given`` as for :meth:`arch`. Not validated here: the stage validates."""
        classes = self.class_subset()
        return TrainStudentConfig(
            out=out, name=name, kind=self.kind, round=self.round, source=self.source, classes=classes,
            conf_thresh=self.conf_thresh, class_balance=self.class_balance, arch=self.arch(given),
            prompt_epochs=self.prompt_epochs, nms=self.nms, nms_thresh=self.nms_thresh,
            train=self.train_settings(), augment=self.augment(), images=self.images, cluster=cluster,
            overwrite=overwrite, include_flagged=self.include_flagged)


DEFAULTS = TrainStudentOptions()
"""TrainStudentOptions: the one home of train-student's option defaults and conversions."""
