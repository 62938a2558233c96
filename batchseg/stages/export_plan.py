"""The plan of `batchseg export`: settings, the round and source to read, splits, file names.

Splits are a pure function of (seed, image id): an image keeps its split when images
are added or removed, and the same seed gives the same split on any machine.

The command line and a pipeline file's ``export:`` items both fill an
:class:`ExportOptions` (defaults: :class:`ExportConfig`'s) and turn it into the config
here, so neither spells a default or the ``--split`` conversion of its own. This module
stays light (no pyarrow) because the CLI reads those defaults when it is imported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from batchseg.choices import EXPORT_FORMATS
from batchseg.errors import UsageError
from batchseg.io.files import IMAGE_MODES
from batchseg.io.hashing import sha256_bytes
from batchseg.io.statuses import LabelKind

if TYPE_CHECKING:  # io.build_info reads Parquet (pyarrow)
    from batchseg.io.build_info import BuildImage

TRAIN = "train"


@dataclass(frozen=True)
class ExportConfig:
    """One `batchseg export` run. ``round``/``source`` None: chosen from the build."""

    out: Path
    dest: Path
    format: str
    round: int | None = None
    source: str | None = None
    kind: LabelKind = LabelKind.SEMANTIC
    min_score: float = 0.0
    split: tuple[tuple[str, float], ...] = ()  # (name, fraction); the rest is "train"
    seed: int = 0
    images: str = "copy"
    src: Path | None = None  # source images; None: the folder the last embed run read
    tolerance: float = 1.0  # YOLO polygon simplification, pixels
    ignore_value: int = 255  # PNG value of unlabelled pixels
    overwrite: bool = False

    def validate(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if not (self.out / "manifest").is_dir():
            raise UsageError(f"{self.out} is not a batchseg build (no manifest); run `batchseg embed SRC {self.out}` first")
        if self.dest.exists() and not self.dest.is_dir():
            raise UsageError(f"destination {self.dest} exists and is not a folder")
        if self.dest.resolve() == self.out.resolve() or self.out.resolve() in self.dest.resolve().parents:
            raise UsageError("the destination must be outside the build folder OUT")
        if self.kind not in tuple(LabelKind):
            raise UsageError(f"--kind must be one of {', '.join(LabelKind)}, got {self.kind!r}")
        if self.format == "png" and self.kind != LabelKind.SEMANTIC:
            raise UsageError("--format png writes semantic label maps (one class per pixel); use --kind semantic")
        if not 0.0 <= self.min_score <= 1.0:
            raise UsageError(f"--min-score must be in [0, 1], got {self.min_score}")
        if self.round is not None and self.round < 0:
            raise UsageError(f"--round must be 0 or more, got {self.round}")
        if self.images not in IMAGE_MODES:
            raise UsageError(f"--images must be one of {', '.join(IMAGE_MODES)}, got {self.images!r}")
        if self.tolerance < 0:
            raise UsageError(f"--tolerance must be 0 or more pixels, got {self.tolerance}")
        if not 1 <= self.ignore_value <= 65535:
            raise UsageError(f"--ignore-value must be in 1..65535, got {self.ignore_value}")
        if self.src is not None and not self.src.is_dir():
            raise UsageError(f"--src {self.src} is not a folder")

    def settings(self) -> dict:
        """What the files in DEST depend on: a rerun with other settings needs --overwrite."""
        data = asdict(self)
        for key in ("out", "dest", "src", "overwrite"):
            data.pop(key)
        data["split"] = [list(pair) for pair in self.split]
        return data

    def to_json(self) -> dict:
        return {**self.settings(), "out": str(self.out), "dest": str(self.dest),
                "src": str(self.src) if self.src else None, "overwrite": self.overwrite}


def parse_split(text: str | None) -> tuple[tuple[str, float], ...]:
    """``"val=0.1,test=0.05"`` -> (("val", 0.1), ("test", 0.05)); the rest of the images is train."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        try:
            fraction = float(value) if sep else float("nan")
        except ValueError:
            fraction = float("nan")
        if not name or not name.isidentifier() or not 0.0 < fraction < 1.0:
            raise UsageError(f"--split takes NAME=FRACTION pairs with 0 < FRACTION < 1, e.g. val=0.1; got {item!r}")
        if name == TRAIN or name in (n for n, _ in pairs):
            raise UsageError(f"--split names must be distinct and not {TRAIN!r} (the rest is train); got {name!r}")
        pairs.append((name, fraction))
    if sum(f for _, f in pairs) >= 1.0:
        raise UsageError(f"--split fractions must add up to less than 1 (the rest is train), got {text!r}")
    return tuple(pairs)


@dataclass(frozen=True)
class ExportOptions:
    """Every `export` option but OUT, DEST and ``--format`` (required: they have no default)
    and ``--overwrite``, under its Python name, as given: ``split`` is the text
    ``val=0.1,test=0.1``. :meth:`config` converts it."""

    round: int | None = ExportConfig.round
    source: str | None = ExportConfig.source
    kind: str = ExportConfig.kind.value
    min_score: float = ExportConfig.min_score
    split: str | None = None  # None or "": no held-out split (ExportConfig.split ())
    seed: int = ExportConfig.seed
    images: str = ExportConfig.images
    src: Path | None = ExportConfig.src
    tolerance: float = ExportConfig.tolerance
    ignore_value: int = ExportConfig.ignore_value

    def split_pairs(self) -> tuple[tuple[str, float], ...]:
        """``split`` as (name, fraction) pairs; ``UsageError`` naming the bad pair."""
        return parse_split(self.split)

    def config(self, out: Path, dest: Path, format: str, overwrite: bool = False) -> ExportConfig:
        """The run's config. Not validated here: the stage validates."""
        return ExportConfig(out=out, dest=dest, format=format, round=self.round, source=self.source, kind=self.kind,
                            min_score=self.min_score, split=self.split_pairs(), seed=self.seed, images=self.images,
                            src=self.src, tolerance=self.tolerance, ignore_value=self.ignore_value,
                            overwrite=overwrite)


DEFAULTS = ExportOptions()
"""ExportOptions: the one home of export's option defaults and conversions."""


def split_names(split: tuple[tuple[str, float], ...]) -> list[str]:
    return [TRAIN] + [name for name, _ in split]


def unit_interval(seed: int, image_id: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, image id)."""
    return int(sha256_bytes(f"{seed}:{image_id}".encode())[:16], 16) / 2.0**64  # the digest's first 8 bytes


def assign_split(image_id: str, split: tuple[tuple[str, float], ...], seed: int) -> str:
    u, edge = unit_interval(seed, image_id), 0.0
    for name, fraction in split:
        edge += fraction
        if u < edge:
            return name
    return TRAIN


def export_names(images: dict[str, BuildImage]) -> dict[str, str]:
    """Relative name of each image in DEST (its source path), made unique per stem.

    Label files drop the extension, so two images ``a/x.jpg`` and ``a/x.png`` would share
    ``a/x.txt``: the second keeps its path with a short id suffix on the stem.
    """
    names: dict[str, str] = {}
    stems: set[str] = set()
    for image in sorted(images.values(), key=lambda im: im.path):
        path = PurePosixPath(image.path)
        stem = str(path.with_suffix(""))
        if stem in stems:
            path = path.with_name(f"{path.stem}__{image.image_id[:8]}{path.suffix}")
            stem = str(path.with_suffix(""))
        stems.add(stem)
        names[image.image_id] = str(path)
    return names
