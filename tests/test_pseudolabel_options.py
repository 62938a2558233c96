"""PseudolabelOptions: the one home of pseudolabel's option defaults and conversions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchseg.cluster import ClusterSettings
from batchseg.config import LabelSettings
from batchseg.errors import UsageError
from batchseg.stages.pseudolabel_options import PseudolabelOptions
from batchseg.labels.settings import ProposalSettings, SelfTrainSettings
from batchseg.models.vocabulary import MASKCLIP_TEMPLATES, parse_classes
from batchseg.pipeline.schema import PSEUDOLABEL
from batchseg.pipeline.stage_configs import VOCABULARY_KEYS
from helpers import parsed_options

FIELDS = {f.name for f in dataclasses.fields(PseudolabelOptions)}
VOCAB = parse_classes("cat,dog")


def test_every_command_option_is_a_field_with_the_same_default():
    options = parsed_options("pseudolabel", ["OUT", "--classes", "cat"], {"out", "classes", "vocab", "templates",
                                                                          "overwrite", "quiet"})
    assert set(options) == FIELDS
    assert PseudolabelOptions(**options) == PseudolabelOptions()


def test_every_pipeline_key_is_a_field():
    keys = {name.replace("-", "_") for name in PSEUDOLABEL} - set(VOCABULARY_KEYS)
    assert keys == FIELDS


def test_defaults_are_the_settings_defaults():
    options = PseudolabelOptions()
    assert options.selftrain_settings() == SelfTrainSettings()
    assert options.label_settings(VOCAB, MASKCLIP_TEMPLATES) == LabelSettings(
        vocabulary=VOCAB, templates=MASKCLIP_TEMPLATES, proposals=ProposalSettings())


@pytest.mark.parametrize("given, field, expected", [
    ({"stop_agreement": 1.0}, "stop_agreement", None),
    ({"stop_agreement": 0.9}, "stop_agreement", 0.9),
    ({"ema_decay": 0.0}, "ema_decay", None),
    ({"class_quantile": 0.0}, "class_quantile", None),
    ({"class_quantile": 0.25}, "class_quantile", 0.25),
])
def test_off_values_become_none(given, field, expected):
    assert getattr(PseudolabelOptions(**given).selftrain_settings(), field) == expected


@pytest.mark.parametrize("given, field, expected", [
    ({"no_key_smoothing": True}, "key_smoothing", "off"),
    ({"key_smoothing": "on"}, "key_smoothing", "on"),
    ({"sam": True}, "sam", "on"),
    ({"sam": False}, "sam", "off"),
    ({"no_prompt_denoising": True}, "prompt_denoising", False),
])
def test_label_conversions(given, field, expected):
    assert getattr(PseudolabelOptions(**given).label_settings(VOCAB, ()), field) == expected


def test_nms_threshold_applies_to_boxes_and_masks():
    proposals = PseudolabelOptions(nms_thresh=0.4).label_settings(VOCAB, ()).proposals
    assert (proposals.box_nms_thresh, proposals.mask_nms_thresh) == (0.4, 0.4)


@pytest.mark.parametrize("given, message", [
    ({"points_per_side": 0}, "points_per_side"),
    ({"key_smoothing": "on", "no_key_smoothing": True}, "contradicts"),
])
def test_bad_values_are_usage_errors(given, message):
    with pytest.raises(UsageError, match=message):
        PseudolabelOptions(**given).label_settings(VOCAB, ())


def test_config_carries_the_run_fields(tmp_path: Path):
    config = PseudolabelOptions(rounds=2, shard_size=7, include_flagged=True).config(
        tmp_path, VOCAB, (), ClusterSettings(), overwrite=True, retrain="never")
    assert (config.rounds, config.shard_size, config.include_flagged, config.overwrite, config.retrain) == (
        2, 7, True, True, "never")
