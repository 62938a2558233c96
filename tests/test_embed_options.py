"""embed's options have one home (stages/embed_options): the command line and a pipeline file's
``models:`` and ``embed:`` sections get the same defaults and conversions from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchseg.cluster import ClusterSettings
from batchseg.config import EmbedConfig
from batchseg.errors import UsageError
from batchseg.models.specs import ClipSpec, ModelSettings, SamSpec
from batchseg.pipeline.schema import EMBED, MODELS
from batchseg.pipeline.spec import load_pipeline
from batchseg.stages.embed_options import EmbedOptions
from helpers import parsed_options, run_cli

FIELDS = {f.name for f in dataclasses.fields(EmbedOptions)}


def test_every_command_option_is_a_field_with_the_same_default():
    options = parsed_options("embed", ["SRC", "OUT"], {"src", "out", "dense_form", "overwrite", "verify", "repair",
                                                       "quiet"})
    assert set(options) == FIELDS
    assert EmbedOptions(**options) == EmbedOptions()


def test_every_pipeline_key_is_a_field():
    assert {name.replace("-", "_") for name in (*MODELS, *EMBED)} == FIELDS


def test_defaults_are_the_settings_defaults(tmp_path: Path):
    config = EmbedOptions(sam_checkpoint="sam.pth").config(tmp_path / "src", tmp_path / "out", ClusterSettings())
    assert config == EmbedConfig(source=tmp_path / "src", out=tmp_path / "out", models=ModelSettings(
        clip=ClipSpec("ViT-B-16", "openai"), sam=SamSpec("vit_b", "sam.pth")))


@pytest.mark.parametrize("given, expected", [
    ({}, "openai"),
    ({"clip_pretrained": "laion2b_s34b_b88k"}, "laion2b_s34b_b88k"),
    ({"clip_pretrained": "random"}, None),
    ({"clip_model": "local-dir:models/clip"}, None),
    ({"clip_model": "local-dir:models/clip", "clip_pretrained": "w.pt"}, "w.pt"),
])
def test_pretrained_tag(given, expected):
    assert EmbedOptions(**given).pretrained_tag() == expected


@pytest.mark.parametrize("given, field, expected", [
    ({"no_clip": True}, "clip", None),
    ({"no_sam": True}, "sam", None),
    ({"sam_model": "tiny", "sam_checkpoint": "random"}, "sam", SamSpec("tiny", None)),
    ({"canvas": 224}, "clip_canvas", 224),
    ({}, "clip_fine_canvas", 0),
    ({"canvas": 224, "fine_canvas": 448}, "clip_fine_canvas", 448),
    ({"precision": "fp32"}, "precision", "fp32"),
])
def test_model_conversions(given, field, expected):
    assert getattr(EmbedOptions(**given).models(), field) == expected


@pytest.mark.parametrize("given, field, expected", [
    ({}, "max_pixels", EmbedConfig.max_pixels),
    ({"max_pixels": 0}, "max_pixels", EmbedConfig.max_pixels),  # on the command line and in a pipeline file
    ({"max_pixels": 1000}, "max_pixels", 1000),
    ({"batch_size": 2, "shard_size": 4}, "shard_size", 4),
])
def test_config_conversions(tmp_path: Path, given, field, expected):
    assert getattr(EmbedOptions(**given).config(tmp_path, tmp_path / "o", ClusterSettings()), field) == expected


@pytest.mark.parametrize("given, message", [
    ({"no_clip": True, "no_sam": True}, "nothing to compute"),
    ({"canvas": 8}, "--canvas must be at least 16 pixels"),
    ({"canvas": 224, "fine_canvas": 224}, r"--fine-canvas must be larger than --canvas \(224\), got 224"),
    ({"fine_canvas": -1}, "--fine-canvas must be at least 16 pixels, got -1"),
    ({"no_clip": True, "fine_canvas": 448}, "--fine-canvas needs CLIP"),
])
def test_bad_values_are_usage_errors(given, message):
    with pytest.raises(UsageError, match=message):
        EmbedOptions(**given).models().validate()


def test_the_command_keeps_its_own_refusals(tmp_path: Path):
    """Refusals worded for the command line stay there: --dense-form, SAM weights, SAM folders."""
    args = ["embed", str(tmp_path / "src"), str(tmp_path / "out")]
    for extra, words in ((["--dense-form", "clear"], "--dense-form is gone"),
                         ([], "SAM needs weights: pass --sam-checkpoint PATH"),
                         (["--sam-model", str(tmp_path), "--sam-checkpoint", "x.pth"], "drop --sam-checkpoint")):
        result = run_cli([*args, *extra])
        assert result.exit_code == 2 and words in result.output, result.output


def test_a_pipeline_gets_the_command_lines_config(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "clip").mkdir()
    (tmp_path / "sam.safetensors").write_bytes(b"")
    path = tmp_path / "p.yaml"
    path.write_text("sources: images\nout: build\nmodels:\n  clip-model: local-dir:clip\n  sam-model: tiny\n"
                    "  sam-checkpoint: sam.safetensors\n  precision: fp32\nembed:\n  shard-size: 16\n")
    pipeline = load_pipeline(path)
    expected = EmbedOptions(clip_model=f"local-dir:{tmp_path / 'clip'}", sam_model="tiny",
                            sam_checkpoint=str(tmp_path / "sam.safetensors"), precision="fp32", shard_size=16).config(
        (tmp_path / "images").resolve(), tmp_path / "build", pipeline.cluster)
    assert pipeline.embed == expected
