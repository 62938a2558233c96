"""The toy CLIP training script (examples/train_toy_clip.py), run for a few steps at a tiny size."""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
from helpers import example_module
import torch
from safetensors.torch import load_file

from batchseg.models.clip import WEIGHTS_FILE, ClipSpec, load_dense_clip
from batchseg.models.text import MASKCLIP_TEMPLATES
from batchseg.world import CLASS_NAMES

@pytest.fixture(scope="module")
def script():
    with example_module("train_toy_clip") as module:
        yield module


def _tiny(script, out: Path, **overrides):
    settings = dict(
        out=str(out), minutes=None, steps=12, threads=1, seed=3,
        arch="vit", image_size=32, patch_size=8, vision_width=32, vision_layers=1, embed_dim=16,
        text_width=32, text_layers=1, batch_size=4, lr=3e-3, warmup=2,
        templates_per_class=2, eval_every=6, eval_images=4,
    )
    settings.update(overrides)
    return script.TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(script, tmp_path_factory):
    cfg = _tiny(script, tmp_path_factory.mktemp("toy-clip") / "a")
    return cfg, script.train(cfg, log=lambda _: None)


def test_saved_folder_loads_through_the_pipeline(trained):
    cfg, result = trained
    out = Path(cfg.out)
    assert (out / "open_clip_config.json").is_file() and (out / WEIGHTS_FILE).is_file()
    clip = load_dense_clip(ClipSpec("local-dir:" + str(out)))
    assert (clip.canvas, clip.patch, clip.grid, clip.dense_dim) == (32, 8, 4, 16)
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(out))
    assert tokenizer.context_length == cfg.context_length
    prompt = MASKCLIP_TEMPLATES[0].replace("{}", CLASS_NAMES[0])
    with torch.no_grad():
        text = clip.model.encode_text(tokenizer([prompt]))
        dense = clip(torch.zeros(1, 3, 32, 32)).dense
    assert text.shape == (1, 16) and dense.shape == (1, 16, 4, 4)
    assert torch.isfinite(text).all() and torch.isfinite(dense).all()
    # Shipped as float16 (size), loaded into a float32 model.
    assert {v.dtype for v in load_file(str(out / WEIGHTS_FILE)).values() if v.is_floating_point()} == {torch.float16}
    card = (out / "MODEL_CARD.md").read_text()
    assert "What it is NOT" in card and "--steps 12" in card
    # Scores: step 0 (random init), the periodic one, and the saved weights'.
    assert [e["step"] for e in result.evals] == [0, 6, 12]
    assert 0.0 <= result.final["miou_plain"] <= 1.0


def test_loss_decreases(trained):
    _, result = trained
    losses = [r["loss"] for r in result.losses]
    assert len(losses) == 12 and all(map(lambda v: v == v, losses))  # no NaN
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_same_seed_same_weights(script, trained, tmp_path):
    cfg, _ = trained
    again = script.train(_tiny(script, tmp_path / "b", write_card=False), log=lambda _: None)
    assert again.steps == 12
    first = load_file(str(Path(cfg.out) / WEIGHTS_FILE))
    second = load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_patch_targets_fractions(script):
    import numpy as np

    sem = np.zeros((1, 16, 16), np.uint8)
    sem[0, :8, :4] = 1  # class 0 on half of the top-left 8x8 cell
    sem[0, 8:, 8:] = 255  # bottom-right cell is all padding
    mix, valid = script.patch_targets(sem, 8)
    assert mix.shape == (1, 13, 2, 2)
    assert torch.allclose(mix[0, :, 0, 0][[0, 12]], torch.tensor([0.5, 0.5]))
    assert valid[0].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert torch.allclose(mix[0].sum(0)[valid[0] > 0], torch.ones(3))


def test_resnet_tower_trains_saves_and_loads(script, tmp_path):
    cfg = _tiny(script, tmp_path / "rn", arch="resnet", image_size=64, vision_width=8, steps=3, eval_every=0,
                write_card=False)
    result = script.train(cfg, log=lambda _: None)
    clip = load_dense_clip(ClipSpec("local-dir:" + str(tmp_path / "rn")))
    assert (clip.kind, clip.grid) == ("resnet", 2)
    # BatchNorm statistics were trained and saved (integer counters stay integers).
    state = load_file(str(tmp_path / "rn" / WEIGHTS_FILE))
    counters = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert counters and all(v.dtype == torch.int64 and int(v) == 3 for v in counters)
    assert result.steps == 3 and 0.0 <= result.final["miou_plain"] <= 1.0


def test_shape_only_dense_loss_ignores_colour(script):
    """The shape phase's loss: the same for two cells of one shape in different colours, and it
    equals the cross entropy over the shape words against each cell's shape mix, by hand."""
    torch.manual_seed(0)
    concepts = torch.nn.functional.normalize(torch.randn(len(script.CONCEPTS), 8), dim=1)
    dense = torch.randn(1, 8, 1, 2)
    mix = torch.zeros(1, 13, 1, 2)
    mix[0, CLASS_NAMES.index("red circle"), 0, 0] = 1.0
    mix[0, CLASS_NAMES.index("blue circle"), 0, 1] = 0.5
    mix[0, 12, 0, 1] = 0.5  # half background
    valid = torch.ones(1, 1, 2)
    loss = script.dense_loss(dense, concepts, mix, valid, scale=10.0, shape_only=True)
    ids = script._SHAPE_IDS
    logits = 10.0 * torch.einsum("d,cd->c", torch.nn.functional.normalize(dense[0, :, 0, 0], dim=0), concepts[ids])
    logits2 = 10.0 * torch.einsum("d,cd->c", torch.nn.functional.normalize(dense[0, :, 0, 1], dim=0), concepts[ids])
    circle = ids.index(script.CONCEPTS.index("circle"))
    ce0 = -torch.log_softmax(logits, 0)[circle]
    ce1 = -(0.5 * torch.log_softmax(logits2, 0)[circle] + 0.5 * torch.log_softmax(logits2, 0)[-1])
    torch.testing.assert_close(loss, (ce0 + ce1) / 2)
    recoloured = mix.clone()
    recoloured[0, :, 0, 0] = 0.0
    recoloured[0, CLASS_NAMES.index("green circle"), 0, 0] = 1.0
    torch.testing.assert_close(script.dense_loss(dense, concepts, recoloured, valid, 10.0, shape_only=True), loss)
    assert not torch.allclose(script.dense_loss(dense, concepts, recoloured, valid, 10.0), script.dense_loss(dense, concepts, mix, valid, 10.0))


def test_part_hits_on_objects_counts_shape_and_colour_separately(script):
    ids = {name: CLASS_NAMES.index(name) for name in ("red circle", "red square", "blue circle", "blue triangle")}
    bg = len(CLASS_NAMES)
    major = torch.tensor([[ids["red circle"], ids["red circle"], ids["blue triangle"]],
                          [ids["blue circle"], bg, -1]])
    pred = torch.tensor([[ids["red circle"], ids["red square"], ids["blue circle"]],
                         [bg, ids["red circle"], ids["red circle"]]])
    # Object cells: 4. Right shape: (0,0). Right colour: (0,0), (0,1), (0,2). Background and padding cells do not count.
    assert script.part_hits_on_objects(pred, major) == {"cells": 4, "shape": 1, "colour": 3}


def test_convnext_tower_trains_saves_and_loads(script, tmp_path):
    cfg = _tiny(script, tmp_path / "cnn", arch="convnext", image_size=64, steps=3, eval_every=0)
    result = script.train(cfg, log=lambda _: None)
    clip = load_dense_clip(ClipSpec("local-dir:" + str(tmp_path / "cnn")))
    assert (clip.kind, clip.patch, clip.grid, clip.dense_dim) == ("timm", 32, 2, 16)
    assert result.steps == 3 and 0.0 <= result.final["object_shape_acc"] <= 1.0
    card = (tmp_path / "cnn" / "MODEL_CARD.md").read_text()
    assert "--arch convnext" in card and "test_convnext" in card and "--steps 3" in card
    assert "object cells" in card


def test_convnext_writes_to_its_own_asset_folder_by_default(script):
    assert Path(script.parse_args(["--arch", "convnext"]).out) == script.DEFAULT_CNN_OUT
    assert Path(script.parse_args([]).out) == script.DEFAULT_OUT
    assert script.DEFAULT_CNN_OUT.name == "toy-clip-cnn" and script.DEFAULT_OUT.name == "toy-clip"
