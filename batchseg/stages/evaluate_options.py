"""`evaluate`'s options as a user spells them, and the run config they become.

The command line (``batchseg evaluate OUT --gt masks/ --gt-offset 0``) and a pipeline
file's ``evaluate:`` section (``gt-offset: 0``) name the same options; both fill an
:class:`EvaluateOptions` whose defaults are :class:`EvaluateConfig`'s, so the
ground-truth conventions (which PNG value is ignored, where class ids start) cannot
differ between the two.

:class:`EvaluateConfig` lives here rather than in ``stages.evaluate`` (which re-exports
it) so that the CLI reads its defaults at import without loading numpy, pyarrow and
pycocotools for the evaluation itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchseg.errors import UsageError

if TYPE_CHECKING:
    from batchseg.io.ground_truth import GroundTruthSource


@dataclass(frozen=True)
class EvaluateConfig:
    """One `batchseg evaluate` run."""

    out: Path
    gt: Path
    ignore_index: int = 255  # PNG ground truth: value that is not scored
    gt_offset: int = 1  # PNG ground truth: class id k is stored as k + offset; below offset is background

    def validate(self) -> None:
        if not self.out.is_dir():
            raise UsageError(f"output folder {self.out} does not exist; run `batchseg embed SRC {self.out}` first")
        if not self.gt.exists():
            raise UsageError(f"ground truth {self.gt} does not exist")
        if not (self.gt.is_dir() or self.gt.suffix.lower() == ".json"):
            raise UsageError(
                f"--gt must be a folder of PNG label maps or a COCO instance .json file, got {self.gt}"
            )
        if self.gt_offset < 0:
            raise UsageError(f"--gt-offset must be 0 or more, got {self.gt_offset}")

    @property
    def gt_format(self) -> str:
        return self.ground_truth.format

    @property
    def ground_truth(self) -> GroundTruthSource:
        from batchseg.io.ground_truth import GroundTruthSource  # numpy, PIL, pycocotools: not at CLI import

        return GroundTruthSource(self.gt, self.out, self.ignore_index, self.gt_offset)


@dataclass(frozen=True)
class EvaluateOptions:
    """Every `evaluate` option but OUT and ``--gt`` (required: no default), under its
    Python name (``--gt-offset`` is ``gt_offset``)."""

    ignore_index: int = EvaluateConfig.ignore_index
    gt_offset: int = EvaluateConfig.gt_offset

    def config(self, out: Path, gt: Path) -> EvaluateConfig:
        """The run's config. Not validated here: the stage validates."""
        return EvaluateConfig(out=out, gt=gt, ignore_index=self.ignore_index, gt_offset=self.gt_offset)


DEFAULTS = EvaluateOptions()
"""EvaluateOptions: the one home of evaluate's option defaults."""
