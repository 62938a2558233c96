"""Pipeline files: the shipped ones are valid; bad ones exit 2 naming the file, line and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchseg.errors import UsageError
from batchseg.pipeline.spec import load_pipeline
from helpers import run_cli

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.fixture
def world(tmp_path) -> Path:
    (tmp_path / "world" / "images").mkdir(parents=True)
    (tmp_path / "world" / "gt").mkdir()
    (tmp_path / "world" / "classes.txt").write_text("red thing\nblue thing\n")
    (tmp_path / "sam.safetensors").write_bytes(b"")
    return tmp_path


GOOD = """\
sources: world/images
out: build
models:
  clip-model: local-dir:clip
  sam-model: tiny
  sam-checkpoint: sam.safetensors
pseudolabel:
  classes: [red thing, blue thing]
  rounds: 2
"""


def write(root: Path, text: str) -> Path:
    path = root / "p.yaml"
    path.write_text(text)
    return path


def test_demo_pipeline_is_valid_and_names_the_demo_models(world):
    pipeline = load_pipeline(PIPELINES / "demo.yaml", (
        f"sources={world / 'world' / 'images'}", f"out={world / 'out'}",
        f"pseudolabel.vocab={world / 'world' / 'classes.txt'}", f"evaluate.gt={world / 'world' / 'gt'}"))
    assert pipeline.stages() == ("embed", "pseudolabel", "evaluate")
    assert pipeline.embed.models.clip.model.endswith("batchseg/assets/toy-clip-cnn")
    assert Path(pipeline.embed.models.sam.checkpoint).name == "toy-sam.safetensors"
    assert Path(pipeline.embed.models.sam.checkpoint).is_file()  # the shipped model, relative to the file
    assert pipeline.pseudolabel.rounds == 1 and pipeline.pseudolabel.labels.background
    assert pipeline.pseudolabel.retrain == "fraction" and pipeline.embed.shard_size == 8


def test_nightly_example_is_valid_with_every_stage(world):
    (world / "incoming").mkdir()
    (world / "archive" / "2024").mkdir(parents=True)
    (world / "archive" / "2025").mkdir()
    pipeline = load_pipeline(PIPELINES / "nightly.example.yaml", (
        f"sources=[{world / 'incoming'}, {world / 'archive' / '20*'}]", f"out={world / 'out'}",
        f"pseudolabel.vocab={world / 'world' / 'classes.txt'}",
        f"export.0.dest={world / 'coco'}", f"export.1.dest={world / 'yolo'}"))
    assert pipeline.stages() == ("embed", "qc", "pseudolabel", "train-student", "export", "report")
    assert [s.name for s in pipeline.students] == ["semantic", "yolact"] and pipeline.students[1].nms == "noh"
    assert pipeline.cluster.gpus == 4 and pipeline.embed.models.sam.model == "vit_h"
    assert pipeline.embed.source == world.resolve()  # several sources: their common folder, restricted to them
    assert set(pipeline.embed.include) == {world.resolve() / "incoming", world.resolve() / "archive" / "2024",
                                           world.resolve() / "archive" / "2025"}
    assert pipeline.qc.settings.features == "dense-mean" and pipeline.exports[0].split == (("val", 0.1),)


def test_relative_paths_are_relative_to_the_file_and_cli_sets_win(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "world")
    pipeline = load_pipeline(write(world, GOOD), ("pseudolabel.rounds=0", "out=elsewhere"), scheduler="tcp://x:1")
    assert pipeline.embed.source == (world / "world" / "images").resolve()
    assert pipeline.out == tmp_path / "world" / "elsewhere"  # --set: from the working folder
    assert pipeline.pseudolabel.rounds == 0 and pipeline.cluster.scheduler == "tcp://x:1"


@pytest.mark.parametrize("text, line, words", [
    (GOOD.replace("rounds: 2", "rounds: 2: 3"), 9, "YAML syntax error: mapping values are not allowed here"),
    (GOOD + "pseudolable:\n  rounds: 1\n", 10, "unknown stage or key 'pseudolable'; allowed: sources, out, models"),
    (GOOD.replace("rounds: 2", "rounds: two"), 9, "pseudolabel.rounds: must be an integer, got string 'two'"),
    (GOOD.replace("rounds: 2", "round: 2"), 9, "unknown key 'round'; allowed: classes, vocab"),
    (GOOD.replace("world/images", "world/missing"), 1, "source folder"),
    (GOOD.replace("out: build", "out: world/images/out"), 2, "is inside the source folder"),
    (GOOD.replace("rounds: 2", "rounds: 99"), 7, "--rounds must be between 0 and 50"),
    (GOOD + "report:\n  per-class: 1\n  per_class: 2\n", 12, "given twice"),
    (GOOD.replace("  sam-checkpoint: sam.safetensors\n", ""), 3, "SAM needs weights"),
    (GOOD + "train-student:\n  - name: a\n    kind: panoptic\n", 12, "must be one of semantic, instance"),
    (GOOD + "retrain: sometimes\n", 10, "must be one of always, never, fraction"),
    (GOOD + "train-student:\n  - name: a\n  - name: a\n", 12, "train-student[1].name: a is used twice"),
])
def test_bad_pipeline_files_exit_2_naming_the_line(world, text, line, words):
    path = write(world, text)
    result = run_cli(["build", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"error: {path}, line {line}"), message
    assert words in message, message
    assert "Traceback" not in result.output


def test_a_bad_set_value_is_named_as_given(world):
    with pytest.raises(UsageError, match=r"p.yaml, --set pseudolabel.rounds=many: pseudolabel.rounds: must be an integer"):
        load_pipeline(write(world, GOOD), ("pseudolabel.rounds=many",))
    with pytest.raises(UsageError, match="--set takes KEY=VALUE"):
        load_pipeline(write(world, GOOD), ("rounds",))


def test_missing_and_empty_files_are_usage_errors(world):
    with pytest.raises(UsageError, match="does not exist"):
        load_pipeline(world / "nope.yaml")
    with pytest.raises(UsageError, match="is empty"):
        load_pipeline(write(world, "# nothing\n"))
    with pytest.raises(UsageError, match="missing required key 'out'"):
        load_pipeline(write(world, "sources: world/images\nmodels: {no-sam: true}\n"))


@pytest.mark.parametrize("policy, trained, now, retrain", [
    ("always", 100, 101, True), ("never", 100, 1000, False),
    ("fraction", 100, 110, False), ("fraction", 100, 111, True), ("fraction", 100, 90, False),
])
def test_retrain_policy(policy, trained, now, retrain):
    from batchseg.config import must_retrain

    assert must_retrain(policy, 0.1, trained, now) is retrain


def test_several_sources_embed_only_their_files(world):
    from batchseg.io.images import discover_images
    from batchseg.stages.embed import included
    from batchseg.testing import write_image_folder

    for name in ("cams/north", "cams/south", "cams/private"):
        write_image_folder(world / name, 2, seed=len(name))
    text = GOOD.replace("sources: world/images", "sources: [cams/north, cams/s*]")
    pipeline = load_pipeline(write(world, text))
    assert pipeline.embed.source == (world / "cams").resolve()
    found = included(discover_images(pipeline.embed.source), pipeline.embed)
    assert {f.rel_path.split("/")[0] for f in found} == {"north", "south"} and len(found) == 4


def test_pseudolabel_defaults_agree_between_cli_pipeline_and_settings(world):
    """The CLI, the pipeline file and the settings dataclasses each spell the defaults; they must agree."""
    import dataclasses

    from batchseg.cli import cli
    from batchseg.config import LabelSettings
    from batchseg.labels.settings import ProposalSettings, SelfTrainSettings

    config = load_pipeline(write(world, GOOD), ()).pseudolabel
    assert config.selftrain == SelfTrainSettings()
    assert config.labels.proposals == ProposalSettings()
    label_defaults = {f.name: f.default for f in dataclasses.fields(LabelSettings)
                      if f.default is not dataclasses.MISSING}
    for name, default in label_defaults.items():
        if name not in ("sam", "proposals"):  # "auto" spelt as None on the command line; compared above
            assert getattr(config.labels, name) == default, name
    selftrain_defaults = dataclasses.asdict(SelfTrainSettings())
    compared = 0
    for param in cli.commands["pseudolabel"].params:
        for defaults in (selftrain_defaults, label_defaults):
            if param.name in defaults and defaults[param.name] is not None and param.name != "sam":
                given = param.default
                if getattr(param, "is_flag", False) and not isinstance(given, bool):
                    given = False  # a bare flag (click leaves its default unset)
                assert given == defaults[param.name], f"--{param.name}: {given} vs {defaults[param.name]}"
                compared += 1
    assert compared >= 10


@pytest.mark.parametrize("given, expected", [
    ({}, "auto"), ({"key-smoothing": "on"}, "on"), ({"no-key-smoothing": True}, "off"),
    ({"key-smoothing": "off", "no-key-smoothing": True}, "off"),
])
def test_key_smoothing_keys(world, given, expected):
    text = GOOD.replace("pseudolabel:\n", "pseudolabel:\n" + "".join(
        f"  {k}: {str(v).lower()}\n" for k, v in given.items()))
    assert load_pipeline(write(world, text), ()).pseudolabel.labels.key_smoothing == expected


def test_key_smoothing_contradiction_names_the_file(world):
    text = GOOD.replace("pseudolabel:\n", "pseudolabel:\n  key-smoothing: on\n  no-key-smoothing: true\n")
    with pytest.raises(UsageError, match="contradicts --key-smoothing on"):
        load_pipeline(write(world, text), ())
