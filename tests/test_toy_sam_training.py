"""The toy-SAM training script (examples/train_toy_sam.py) at a few steps.

Checks what the shipped model relies on: the batched decoder is segment-anything's
decoder, a checkpoint loads through the normal SAM path, training lowers the loss,
and a seed (or a --minutes run's printed step count) reproduces the weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import example_module
import torch
from torch.testing import assert_close

from batchseg.models.sam import SAM_ARCHS, SamEncoder, SamSpec, build_sam_model, load_sam

@pytest.fixture(scope="module")
def trainer():
    with example_module("train_toy_sam") as module:
        yield module


def _config(trainer, out: Path, **overrides):
    base = trainer.TrainConfig(
        out=str(out), steps=12, threads=1, seed=3, batch_images=4, warmup_steps=4,
        eval_images=4, eval_everything_images=1, eval_every=0, log_every=4,
    )
    return dataclasses.replace(base, **overrides)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_batched_decoder_equals_sam_decoder(trainer):
    """decode_batched on one image's prompts == sam.mask_decoder (all 4 mask tokens)."""
    torch.manual_seed(0)
    sam = build_sam_model(SAM_ARCHS["tiny"])
    with torch.no_grad():  # non-zero tables so every path matters
        for p in sam.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    emb = torch.randn(1, *SamEncoder(sam).embed_shape)
    coords = torch.rand(5, 1, 2) * 200
    labels = torch.ones(5, 1, dtype=torch.int)
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        want_masks, want_iou = sam.mask_decoder.predict_masks(
            image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        )
        got_masks, got_iou = trainer.decode_batched(sam, emb.expand(5, -1, -1, -1), sparse, dense)
    assert_close(got_masks, want_masks, rtol=1e-5, atol=1e-5)
    assert_close(got_iou, want_iou, rtol=1e-5, atol=1e-5)


def test_loss_points_estimate_full_resolution_loss(trainer):
    """Stratified points give the full-image dice and IoU that upsampled masks give."""
    torch.manual_seed(0)
    sam = build_sam_model(SAM_ARCHS["tiny"])
    encoder = SamEncoder(sam)
    item = trainer.prepare(encoder, 5, 0)
    h, w = item.original_size
    gt = item.masks[0]
    # Logits that are a blurred version of the ground truth, on the low-res grid.
    canvas = torch.zeros(1, 1, 256, 256)
    vh, vw = item.input_size
    canvas[0, 0, :vh, :vw] = torch.nn.functional.interpolate(
        torch.from_numpy(gt).float()[None, None], (vh, vw), mode="bilinear", align_corners=False)[0, 0]
    low = torch.nn.functional.avg_pool2d(canvas, 4) * 12 - 5  # (1, 1, 64, 64)
    rng = np.random.default_rng(0)
    pts = trainer.sample_loss_points(rng, [item], [0], [0], 256, (2000, 2000, 4000))
    _, dice, _, iou = trainer.mask_losses(low, pts, 2.0)
    full = sam.postprocess_masks(low, (vh, vw), (h, w))[0, 0]
    pred = full > 0
    true_iou = (pred & torch.from_numpy(gt)).sum() / (pred | torch.from_numpy(gt)).sum()
    prob = torch.sigmoid(full)
    t = torch.from_numpy(gt).float()
    true_dice = 1 - (2 * (prob * t).sum() + 1) / (prob.sum() + t.sum() + 1)
    assert abs(float(iou[0, 0]) - float(true_iou)) < 0.03
    assert abs(float(dice[0, 0]) - float(true_dice)) < 0.03


def test_training_runs_saves_loads_and_reproduces(trainer, tmp_path):
    out = tmp_path / "a" / "toy-sam.safetensors"
    result = trainer.train(_config(trainer, out), log=lambda s: None)

    # Loadable through the path `batchseg embed --sam-model tiny --sam-checkpoint` uses.
    assert out.stat().st_size <= 20 * 2**20
    sam = load_sam(SamSpec("tiny", str(out)))
    assert SamEncoder(sam).embed_shape == (32, 16, 16)
    card = out.with_suffix(".md").read_text()
    assert "random init" in card and "sha256" in card and _digest(out) in card
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["checkpoint_sha256"] == _digest(out)

    # The fixed-prompt evaluation loss went down from the random init.
    first, last = result["evals"][0], result["evals"][-1]
    assert (first["step"], last["step"]) == (0, 12)
    assert last["eval_loss"] < first["eval_loss"]
    for key in ("point_miou_top", "box_miou", "iou_head_mae", "everything_kept_per_image"):
        assert np.isfinite(last[key])

    # Same seed -> same bytes; another seed -> other weights.
    again = tmp_path / "b" / "toy-sam.safetensors"
    trainer.train(_config(trainer, again, write_card=False), log=lambda s: None)
    assert _digest(again) == _digest(out)
    other = tmp_path / "c" / "toy-sam.safetensors"
    trainer.train(_config(trainer, other, seed=4, steps=2, write_card=False), log=lambda s: None)
    assert _digest(other) != _digest(out)


def test_minutes_run_is_reproduced_by_its_step_count(trainer, tmp_path):
    """--minutes fixes its length after the warmup; --steps with that number gives the same weights."""
    timed = tmp_path / "timed.safetensors"
    lines: list[str] = []
    result = trainer.train(
        _config(trainer, timed, steps=None, minutes=0.04, eval_everything_images=0, write_card=False),
        log=lines.append,
    )
    steps = result["steps"]
    assert steps > 4 and any(f"--steps {steps}" in line for line in lines)
    fixed = tmp_path / "fixed.safetensors"
    trainer.train(_config(trainer, fixed, steps=steps, eval_everything_images=0, write_card=False), log=lambda s: None)
    assert _digest(fixed) == _digest(timed)


def test_refuses_the_evaluation_seed(trainer, tmp_path):
    with pytest.raises(ValueError, match="held-out"):
        trainer.train(_config(trainer, tmp_path / "x.safetensors", seed=999), log=lambda s: None)
