"""export's options have one home (stages/export_plan.ExportOptions): the command line and a
pipeline file's ``export:`` items get the same defaults and ``--split`` conversion from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchseg.errors import UsageError
from batchseg.pipeline.schema import EXPORT
from batchseg.pipeline.spec import load_pipeline
from batchseg.stages.export_plan import ExportConfig, ExportOptions
from helpers import parsed_options, sam_free_pipeline

FIELDS = {f.name for f in dataclasses.fields(ExportOptions)}
REQUIRED = {"dest", "format"}  # no default: config() arguments, not options


def test_every_command_option_is_a_field_with_the_same_default():
    options = parsed_options("export", ["OUT", "DEST", "--format", "coco"], {"out", "dest", "fmt", "overwrite", "quiet"})
    assert set(options) == FIELDS
    assert ExportOptions(**options) == ExportOptions()


def test_every_pipeline_key_is_a_field():
    assert {name.replace("-", "_") for name in EXPORT} - REQUIRED == FIELDS


def test_defaults_are_the_configs_defaults(tmp_path: Path):
    config = ExportOptions().config(tmp_path / "out", tmp_path / "dest", "coco")
    assert config == ExportConfig(out=tmp_path / "out", dest=tmp_path / "dest", format="coco")


@pytest.mark.parametrize("split, pairs", [
    (None, ()),
    ("", ()),
    ("val=0.1", (("val", 0.1),)),
    (" val = 0.1 , test=0.2", (("val", 0.1), ("test", 0.2))),
])
def test_split_conversion(tmp_path: Path, split, pairs):
    assert ExportOptions(split=split).config(tmp_path, tmp_path / "d", "png").split == pairs


@pytest.mark.parametrize("given, field, expected", [
    ({"kind": "instance"}, "kind", "instance"),
    ({"min_score": 0.5, "seed": 3}, "min_score", 0.5),
    ({"images": "none"}, "images", "none"),
    ({"tolerance": 0.0}, "tolerance", 0.0),
    ({"round": 1, "source": "maskclip"}, "source", "maskclip"),
])
def test_options_reach_the_config(tmp_path: Path, given, field, expected):
    assert getattr(ExportOptions(**given).config(tmp_path, tmp_path / "d", "coco"), field) == expected


def test_overwrite_is_a_run_argument(tmp_path: Path):
    assert ExportOptions().config(tmp_path, tmp_path / "d", "coco", overwrite=True).overwrite


@pytest.mark.parametrize("split, message", [
    ("val", "--split takes NAME=FRACTION pairs"),
    ("val=1.5", "--split takes NAME=FRACTION pairs"),
    ("train=0.1", "--split names must be distinct and not 'train'"),
    ("a=0.6,b=0.5", "--split fractions must add up to less than 1"),
])
def test_bad_splits_are_usage_errors(tmp_path: Path, split, message):
    with pytest.raises(UsageError, match=message):
        ExportOptions(split=split).config(tmp_path, tmp_path / "d", "coco")


def test_a_pipeline_files_bad_split_names_its_key(tmp_path: Path):
    path = sam_free_pipeline(tmp_path, "export:\n  dest: ds\n  format: coco\n  split: val=2\n")
    with pytest.raises(UsageError, match=r"line 8: export\.split: --split takes NAME=FRACTION pairs"):
        load_pipeline(path)


def test_a_pipeline_item_gets_the_command_lines_config(tmp_path: Path):
    path = sam_free_pipeline(tmp_path, "export:\n  dest: ds\n  format: yolo\n  split: val=0.1\n  kind: instance\n")
    expected = ExportOptions(split="val=0.1", kind="instance").config(tmp_path / "build", tmp_path / "ds", "yolo")
    assert load_pipeline(path).exports == (expected,)
