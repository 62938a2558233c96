"""`pseudolabel`'s options as a user spells them, with their one set of defaults.

The command line (``batchseg pseudolabel --points-per-side 16``) and a pipeline file's
``pseudolabel:`` section (``points-per-side: 16``) name the same options; both fill a
:class:`PseudolabelOptions` and turn it into the stage's settings here, so a default or
a conversion (``--stop-agreement 1`` means never stop, ``--ema-decay 0`` means no
average) cannot differ between the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchseg.cluster import ClusterSettings
from batchseg.config import LabelSettings, PseudolabelConfig, key_smoothing_choice
from batchseg.errors import UsageError
from batchseg.labels.settings import ProposalSettings, SelfTrainSettings
from batchseg.models.specs import DenseHeadSettings
from batchseg.models.vocabulary import Vocabulary


@dataclass(frozen=True)
class PseudolabelOptions:
    """Every `pseudolabel` option but the vocabulary, under its Python name (``--bg-floor``
    is ``bg_floor``), each default taken from the settings it becomes. Values are as given;
    :meth:`config` converts them."""

    background: bool = LabelSettings.background
    bg_floor: float | None = LabelSettings.bg_floor
    dense_head: str = DenseHeadSettings.name
    proxy_grid: int = DenseHeadSettings.proxy_grid
    region_vote: str = LabelSettings.region_vote
    bg_mask_vote: bool = LabelSettings.bg_mask_vote
    fine_weight: float = LabelSettings.fine_weight
    pd_thresh: float = LabelSettings.pd_thresh
    no_prompt_denoising: bool = not LabelSettings.prompt_denoising
    key_smoothing: str | None = LabelSettings.key_smoothing
    no_key_smoothing: bool = False  # the older spelling of key_smoothing "off"
    sam: bool | None = None  # None: use SAM when the build stored it (LabelSettings.sam "auto")
    points_per_side: int = ProposalSettings.points_per_side
    pred_iou_thresh: float = ProposalSettings.pred_iou_thresh
    stability_thresh: float = ProposalSettings.stability_score_thresh
    nms_thresh: float = ProposalSettings.box_nms_thresh  # on the boxes, then on the masks
    work_max_side: int = LabelSettings.work_max_side
    rounds: int = PseudolabelConfig.rounds
    conf_thresh: float = SelfTrainSettings.conf_thresh
    class_balance: float = SelfTrainSettings.class_balance
    class_quantile: float = SelfTrainSettings.class_quantile  # 0: per-class thresholds off
    teacher_rounds: int = SelfTrainSettings.teacher_rounds
    stop_agreement: float = SelfTrainSettings.stop_agreement  # >= 1: run every round
    ema_decay: float = SelfTrainSettings.ema_decay  # 0: the last step's weights
    warm_start: bool = SelfTrainSettings.warm_start
    anchor: bool = SelfTrainSettings.anchor
    drift_tolerance: float = SelfTrainSettings.drift_tolerance  # 1: keep every round
    ensemble: bool = SelfTrainSettings.ensemble
    epochs: int = SelfTrainSettings.epochs
    seed: int = SelfTrainSettings.seed
    shard_size: int = PseudolabelConfig.shard_size
    include_flagged: bool = PseudolabelConfig.include_flagged

    def label_settings(self, vocabulary: Vocabulary, templates: tuple[str, ...]) -> LabelSettings:
        """Round 0's settings; ``UsageError`` for a contradiction or a bad SAM proposal value."""
        try:
            proposals = ProposalSettings(
                points_per_side=self.points_per_side, pred_iou_thresh=self.pred_iou_thresh,
                stability_score_thresh=self.stability_thresh, box_nms_thresh=self.nms_thresh,
                mask_nms_thresh=self.nms_thresh)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return LabelSettings(
            vocabulary=vocabulary,
            templates=templates,
            background=self.background,
            bg_floor=self.bg_floor,
            key_smoothing=key_smoothing_choice(self.key_smoothing, self.no_key_smoothing),
            prompt_denoising=not self.no_prompt_denoising,
            pd_thresh=self.pd_thresh,
            sam="auto" if self.sam is None else ("on" if self.sam else "off"),
            proposals=proposals,
            dense_head=DenseHeadSettings(self.dense_head, proxy_grid=self.proxy_grid),
            region_vote=self.region_vote,
            bg_mask_vote=self.bg_mask_vote,
            fine_weight=self.fine_weight,
            work_max_side=self.work_max_side,
        )

    def selftrain_settings(self) -> SelfTrainSettings:
        """The rounds' settings; the off-values (0, 1) become ``None``."""
        return SelfTrainSettings(
            epochs=self.epochs, seed=self.seed, conf_thresh=self.conf_thresh, class_balance=self.class_balance,
            class_quantile=self.class_quantile or None, teacher_rounds=self.teacher_rounds,
            stop_agreement=None if self.stop_agreement >= 1 else self.stop_agreement,
            ema_decay=self.ema_decay or None, warm_start=self.warm_start, anchor=self.anchor,
            drift_tolerance=self.drift_tolerance, ensemble=self.ensemble)

    def config(self, out: Path, vocabulary: Vocabulary, templates: tuple[str, ...], cluster: ClusterSettings,
               **run: object) -> PseudolabelConfig:
        """The run's config; ``run`` holds what is not a labelling choice (``overwrite``,
        ``retrain``, ``retrain_fraction``). Not validated here: the stage validates."""
        return PseudolabelConfig(
            out=out, labels=self.label_settings(vocabulary, templates), selftrain=self.selftrain_settings(),
            rounds=self.rounds, cluster=cluster, shard_size=self.shard_size, include_flagged=self.include_flagged,
            **run)  # type: ignore[arg-type]


DEFAULTS = PseudolabelOptions()
