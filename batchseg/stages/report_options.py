"""`report`'s options as a user spells them, and the run config they become.

The command line (``batchseg report OUT --per-class 8``) and a pipeline file's
``report:`` section (``per-class: 8``) name the same options; both fill a
:class:`ReportOptions` whose defaults are :class:`ReportConfig`'s, so the two cannot
disagree on, say, how many gallery images a class gets.

:class:`ReportConfig` lives here rather than in ``stages.report`` (which re-exports it)
so that the CLI reads its defaults at import without loading Pillow and the page
builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchseg.errors import UsageError

MAX_PER_CLASS = 50


@dataclass(frozen=True)
class ReportConfig:
    """One `batchseg report` run."""

    out: Path
    src: Path | None = None  # source images; None: the folder the last embed run read
    round: int | None = None  # gallery round; None: the last
    source: str | None = None  # gallery label source; None: the round's preferred one
    per_class: int = 4  # gallery images per class
    max_qc_thumbs: int = 48

    def validate(self) -> None:
        if not (self.out / "manifest").is_dir():
            raise UsageError(f"{self.out} is not a batchseg build (no manifest); run `batchseg embed SRC {self.out}` first")
        if self.src is not None and not self.src.is_dir():
            raise UsageError(f"--src {self.src} is not a folder")
        if not 0 <= self.per_class <= MAX_PER_CLASS:
            raise UsageError(f"--per-class must be in 0..{MAX_PER_CLASS}, got {self.per_class}")
        if self.round is not None and self.round < 0:
            raise UsageError(f"--round must be 0 or more, got {self.round}")


@dataclass(frozen=True)
class ReportOptions:
    """Every `report` option but OUT, under its Python name (``--per-class`` is
    ``per_class``; ``--round`` is ``round``)."""

    round: int | None = ReportConfig.round
    source: str | None = ReportConfig.source
    per_class: int = ReportConfig.per_class
    src: Path | None = ReportConfig.src

    def config(self, out: Path) -> ReportConfig:
        """The run's config. Not validated here: the stage validates."""
        return ReportConfig(out=out, src=self.src, round=self.round, source=self.source, per_class=self.per_class)


DEFAULTS = ReportOptions()
"""ReportOptions: the one home of report's option defaults."""
