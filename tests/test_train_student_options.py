"""train-student's options have one home (stages/train_student_options): the command line and a
pipeline file's ``train-student:`` items get the same defaults and conversions from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchseg.cluster import ClusterSettings
from batchseg.errors import UsageError
from batchseg.pipeline.schema import STUDENT
from batchseg.pipeline.spec import load_pipeline
from batchseg.stages.train_student_options import TrainStudentConfig, TrainStudentOptions
from batchseg.students.settings import Augment, SamStudentArch, SemanticArch, TrainSettings, YolactArch
from helpers import run_cli
from helpers import parsed_options, sam_free_pipeline

FIELDS = {f.name for f in dataclasses.fields(TrainStudentOptions)}
CLI_ONLY = {"prompt_epochs"}  # sam-encoder only, a kind pipeline files do not train


def test_every_command_option_is_a_field_with_the_same_default():
    options = parsed_options("train-student", ["OUT", "--name", "s"], {"out", "name", "overwrite", "quiet"})
    assert set(options) == FIELDS
    assert TrainStudentOptions(**options) == TrainStudentOptions()


def test_every_pipeline_key_is_a_field():
    keys = {name.replace("-", "_") for name in STUDENT} - {"name"}
    assert keys == FIELDS - CLI_ONLY


def test_defaults_are_the_configs_defaults(tmp_path: Path):
    config = TrainStudentOptions().config(tmp_path, "s", ClusterSettings())
    assert config == TrainStudentConfig(out=tmp_path, name="s")
    assert (config.arch, config.train, config.augment) == (SemanticArch(), TrainSettings(), Augment())


@pytest.mark.parametrize("arch", [YolactArch, SamStudentArch])
def test_every_kinds_architecture_has_the_options_defaults(arch):
    """One --width (--depth, ...) default serves every kind: the architectures must agree on it."""
    defaults = TrainStudentOptions()
    for f in dataclasses.fields(arch):
        if f.name in FIELDS:
            assert f.default == getattr(defaults, f.name), (arch.__name__, f.name)


@pytest.mark.parametrize("given, attribute, expected", [
    ({"no_flip": True}, "augment", Augment(flip=False)),
    ({"scale_jitter": [0.5, 2]}, "augment", Augment(scale=(0.5, 2))),
    ({"classes": "cat, dog,,"}, "classes", ("cat", "dog")),
    ({"classes": ("cat", "dog,bird")}, "classes", ("cat", "dog", "bird")),
    ({"kind": "instance", "width": 32}, "arch", YolactArch(width=32)),
    ({"kind": "instance", "blocks": "dynamic"}, "arch", YolactArch(blocks="dynamic")),
    ({"kind": "sam-encoder", "width": 32, "depth": 2}, "arch", SamStudentArch(width=32, depth=2)),
    ({"input_size": 64}, "arch", SemanticArch(input_size=64)),
    ({"epochs": 3, "batch_size": 2, "lr": 0.1, "seed": 5}, "train",
     TrainSettings(epochs=3, batch_size=2, lr=0.1, seed=5)),
])
def test_conversions(tmp_path: Path, given, attribute, expected):
    config = TrainStudentOptions(**given).config(tmp_path, "s", ClusterSettings())
    assert getattr(config, attribute) == expected


@pytest.mark.parametrize("given, typed, message", [
    ({"classes": " , "}, (), "--classes is empty: give at least one class name"),
    ({"kind": "sam-encoder"}, ("input_size",), "--input-size does not apply to --kind sam-encoder"),
    ({"kind": "sam-encoder", "nms": "noh"}, ("nms", "nms_thresh"), "--nms does not apply to --kind sam-encoder"),
    ({"kind": "sam-encoder", "classes": "cat"}, ("classes",), "--classes does not apply to --kind sam-encoder"),
])
def test_bad_values_are_usage_errors(tmp_path: Path, given, typed, message):
    with pytest.raises(UsageError, match=message):
        TrainStudentOptions(**given).config(tmp_path, "s", ClusterSettings(), given=typed)


def test_a_sam_encoder_accepts_the_fixed_options_at_their_defaults(tmp_path: Path):
    """Only a typed --input-size is refused: the default (which a sam-encoder ignores) is not."""
    config = TrainStudentOptions(kind="sam-encoder").config(tmp_path, "s", ClusterSettings(), given=("width",))
    assert config.arch == SamStudentArch()


def test_the_command_refuses_a_typed_option_a_sam_encoder_fixes(tmp_path: Path):
    (tmp_path / "out").mkdir()
    result = run_cli(["train-student", str(tmp_path / "out"), "--name", "s", "--kind", "sam-encoder",
                      "--nms-thresh", "0.5"])
    assert result.exit_code == 2, result.output
    assert "error: --nms-thresh does not apply to --kind sam-encoder" in result.output


def test_a_pipeline_files_empty_class_list_names_its_key(tmp_path: Path):
    path = sam_free_pipeline(tmp_path, "train-student:\n  - name: s\n    classes: ' , '\n")
    with pytest.raises(UsageError, match=r"line 7: train-student\[0\]\.classes: is empty: give at least one class name"):
        load_pipeline(path)


def test_a_pipeline_item_gets_the_command_lines_config(tmp_path: Path):
    path = sam_free_pipeline(tmp_path, "train-student:\n  - name: s\n    kind: instance\n    no-flip: true\n    scale-jitter: [0.5, 1]\n")
    pipeline = load_pipeline(path)
    expected = TrainStudentOptions(kind="instance", no_flip=True, scale_jitter=(0.5, 1.0)).config(
        tmp_path / "build", "s", pipeline.cluster)
    assert pipeline.students == (expected,)
