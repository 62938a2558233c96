"""Writers of datasets in the formats training code reads: COCO, PNG label maps, YOLO.

Each writer takes an export one *unit* (the images of one label part) at a time, so
memory stays bounded and a rerun skips units already written; ``finish`` writes what
spans units (COCO JSON assembled from per-unit fragments, legends, data.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterable, Protocol

from batchseg.io.build_info import BuildImage


@dataclass(frozen=True)
class ExportItem:
    """One image to export: where it goes and its label rows (already filtered)."""

    image: BuildImage
    split: str  # "train", "val", ...
    name: str  # relative path of the image inside its split folder, POSIX
    rows: list[dict]

    def label_name(self, suffix: str) -> str:
        return str(PurePosixPath(self.name).with_suffix(suffix))


@dataclass
class UnitResult:
    """What one unit wrote: counts, and the files (relative to DEST) for later cleanup."""

    images: int = 0
    annotations: int = 0
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Category:
    class_id: int
    name: str


class FormatWriter(Protocol):
    def write_unit(self, unit: str, items: Iterable[ExportItem]) -> UnitResult: ...

    def finish(self, units: list[str], splits: list[str]) -> list[str]:
        """Write what spans units; return the files written (relative to DEST)."""
        ...
