"""report's options have one home (stages/report_options): the command line and a pipeline
file's ``report:`` section get the same gallery settings from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchseg.errors import UsageError
from batchseg.pipeline.schema import REPORT
from batchseg.pipeline.spec import load_pipeline
from batchseg.stages.report_options import MAX_PER_CLASS, ReportConfig, ReportOptions
from helpers import parsed_options, sam_free_pipeline

FIELDS = {f.name for f in dataclasses.fields(ReportOptions)}


def test_every_command_option_is_a_field_with_the_same_default():
    options = parsed_options("report", ["OUT"], {"out", "quiet"})
    options["round"] = options.pop("round_index")  # --round's Python name in the CLI
    assert set(options) == FIELDS
    assert ReportOptions(**options) == ReportOptions()


def test_every_pipeline_key_is_a_field():
    assert {name.replace("-", "_") for name in REPORT} == FIELDS


def test_defaults_are_the_configs_defaults(tmp_path: Path):
    assert ReportOptions().config(tmp_path) == ReportConfig(out=tmp_path)


def test_the_stage_reexports_the_config():
    from batchseg.stages import report

    assert report.ReportConfig is ReportConfig


@pytest.mark.parametrize("given, message", [
    ({"per_class": -1}, f"--per-class must be in 0..{MAX_PER_CLASS}, got -1"),
    ({"per_class": MAX_PER_CLASS + 1}, f"--per-class must be in 0..{MAX_PER_CLASS}, got {MAX_PER_CLASS + 1}"),
    ({"round": -2}, "--round must be 0 or more, got -2"),
    ({"src": Path("nowhere")}, "--src nowhere is not a folder"),
])
def test_bad_values_are_usage_errors(tmp_path: Path, monkeypatch, given, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "manifest").mkdir()
    with pytest.raises(UsageError, match=message):
        ReportOptions(**given).config(tmp_path).validate()


def test_a_pipeline_gets_the_command_lines_config(tmp_path: Path):
    path = sam_free_pipeline(tmp_path, "report:\n  per-class: 7\n  round: 1\n")
    expected = ReportOptions(per_class=7, round=1).config(tmp_path / "build")
    assert load_pipeline(path).report == expected


def test_an_empty_pipeline_section_gets_the_defaults(tmp_path: Path):
    path = sam_free_pipeline(tmp_path, "report:\n")
    assert load_pipeline(path).report == ReportConfig(out=tmp_path / "build")
