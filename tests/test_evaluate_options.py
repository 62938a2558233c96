"""evaluate's options have one home (stages/evaluate_options): the command line and a pipeline
file's ``evaluate:`` section get the same ground-truth conventions from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchseg.errors import UsageError
from batchseg.pipeline.schema import EVALUATE
from batchseg.pipeline.spec import load_pipeline
from batchseg.stages.evaluate_options import EvaluateConfig, EvaluateOptions
from helpers import parsed_options, sam_free_pipeline

FIELDS = {f.name for f in dataclasses.fields(EvaluateOptions)}


def test_every_command_option_is_a_field_with_the_same_default():
    options = parsed_options("evaluate", ["OUT", "--gt", "GT"], {"out", "gt"})
    assert set(options) == FIELDS
    assert EvaluateOptions(**options) == EvaluateOptions()


def test_every_pipeline_key_is_a_field():
    assert {name.replace("-", "_") for name in EVALUATE} - {"gt"} == FIELDS


def test_defaults_are_the_configs_defaults(tmp_path: Path):
    assert EvaluateOptions().config(tmp_path, tmp_path / "gt") == EvaluateConfig(out=tmp_path, gt=tmp_path / "gt")


def test_the_stage_reexports_the_config():
    from batchseg.stages import evaluate

    assert evaluate.EvaluateConfig is EvaluateConfig


@pytest.mark.parametrize("given, field, expected", [
    ({"gt_offset": 0}, "gt_offset", 0),
    ({"ignore_index": 0}, "ignore_index", 0),
])
def test_options_reach_the_config_and_its_ground_truth(tmp_path: Path, given, field, expected):
    config = EvaluateOptions(**given).config(tmp_path, tmp_path / "gt")
    assert getattr(config, field) == expected
    assert getattr(config.ground_truth, field) == expected


@pytest.mark.parametrize("given, gt, message", [
    ({"gt_offset": -1}, "gt", "--gt-offset must be 0 or more, got -1"),
    ({}, "gt.txt", "--gt must be a folder of PNG label maps or a COCO instance .json file"),
    ({}, "missing", "ground truth .* does not exist"),
])
def test_bad_values_are_usage_errors(tmp_path: Path, given, gt, message):
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt.txt").write_text("")
    with pytest.raises(UsageError, match=message):
        EvaluateOptions(**given).config(tmp_path, tmp_path / gt).validate()


def test_a_pipeline_gets_the_command_lines_config(tmp_path: Path):
    (tmp_path / "gt").mkdir()
    path = sam_free_pipeline(tmp_path, "evaluate:\n  gt: gt\n  gt-offset: 0\n")
    expected = EvaluateOptions(gt_offset=0).config(tmp_path / "build", tmp_path / "gt")
    assert load_pipeline(path).evaluate == expected


def test_the_ground_truth_readers_defaults_agree():
    """io.ground_truth keeps its own defaults (models and io do not import the stages): pinned equal here."""
    from batchseg.io.ground_truth import GroundTruthSource

    defaults = {f.name: f.default for f in dataclasses.fields(GroundTruthSource) if f.name in FIELDS}
    assert defaults == dataclasses.asdict(EvaluateOptions())
