"""Student building blocks, checkpoints and the resumable training loop (no CLI, no Dask)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchseg.students.blocks import BLOCK_KINDS, AttentionMixer, Block
from batchseg.students.checkpoint import committed_epochs, load_latest, save_checkpoint
from batchseg.students.semantic import SemanticArch, SemanticObjective, SemanticStudent, parameter_count
from batchseg.students.train import TrainSettings, make_optimizer, train

NAMES = ("red thing", "blue thing", "background")


def _student(blocks: str = "conv", seed: int = 0) -> SemanticStudent:
    torch.manual_seed(seed)
    text = F.normalize(torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(9)), dim=-1)
    return SemanticStudent(SemanticArch(blocks=blocks, width=16, depth=1, heads=2, input_size=32), text, NAMES)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_blocks_keep_shape_and_mix_across_positions(kind):
    torch.manual_seed(0)
    block = Block(kind, 8, heads=2).eval()
    x = torch.randn(2, 8, 6, 5)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    x2 = x.clone()
    x2[:, :, 0, 0] += 3.0  # a change at one corner reaches a neighbour (conv) or everything (attention)
    assert not torch.allclose(block(x2)[:, :, 1, 1], y[:, :, 1, 1])


def test_dynamic_attention_matches_its_definition():
    """LN(ReLU(q k^T / sqrt(d)) v / N), per head, against an explicit loop."""
    torch.manual_seed(1)
    dim, heads = 8, 2
    mixer = AttentionMixer(dim, heads, relu_norm=True)
    x = torch.randn(1, dim, 3, 4)
    n, d = 12, dim // heads
    qkv = mixer.qkv(x).detach().reshape(3 * dim, n)
    q, k, v = qkv[:dim], qkv[dim : 2 * dim], qkv[2 * dim :]
    out = torch.zeros(dim, n)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        for i in range(n):
            for j in range(n):
                a = max(0.0, float(q[rows, i] @ k[rows, j]) / math.sqrt(d))
                out[rows, i] += a * v[rows, j] / n
    out = F.layer_norm(out.T, (dim,), mixer.out_norm.weight, mixer.out_norm.bias).T
    expected = mixer.project(out.reshape(1, dim, 3, 4))
    torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-4)


def test_softmax_attention_equals_torch_sdpa():
    torch.manual_seed(2)
    mixer = AttentionMixer(8, 2)
    x = torch.randn(2, 8, 3, 3)
    q, k, v = mixer.qkv(x).reshape(2, 3, 2, 4, 9).unbind(1)
    ref = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    expected = mixer.project(ref.transpose(-1, -2).reshape(2, 8, 3, 3))
    torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-4)


def test_block_kinds_have_nearly_equal_parameters():
    counts = {kind: parameter_count(_student(kind)) for kind in BLOCK_KINDS}
    assert max(counts.values()) / min(counts.values()) < 1.1, counts


def test_semantic_student_uses_the_frozen_text_classifier():
    model = _student()
    assert model.num_outputs == 3 and not model.extra_background  # "background" is in the vocabulary
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3, 32, 32)
    assert "text" not in dict(model.named_parameters()) and "text" in model.state_dict()
    weights = model.classifier()
    torch.testing.assert_close(weights[:2], model.text[:2])  # object classes: the text rows, unchanged
    text = F.normalize(torch.randn(2, 16), dim=-1)
    no_bg = SemanticStudent(SemanticArch(width=16, depth=1, heads=2, input_size=32), text, NAMES[:2])
    assert no_bg.extra_background and no_bg.num_outputs == 3


class _ToyData:
    """Random pixels; target = class 0 where the red channel is high, else 1."""

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, 32, 32, generator=g)
        self.targets = (self.pixels[:, 0] > 0).long()
        self.targets[:, :2] = -1
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pixels)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def sample(self, index: int, epoch: int):
        return self.pixels[index], self.targets[index]


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_killed_training_resumes_to_identical_weights(tmp_path):
    settings = TrainSettings(epochs=3, batch_size=4, lr=5e-3, warmup_steps=1, seed=0)
    reference = _student()
    outcome = train(reference, SemanticObjective(_ToyData()), settings, tmp_path / "a")
    assert [r.epoch for r in outcome.records] == [1, 2, 3] and outcome.resumed_from == 0
    assert outcome.records[-1].loss < outcome.records[0].loss

    class Killed(Exception):
        pass

    def die_after_first(record):
        if record.epoch == 2:  # epoch 1 is committed, epoch 2 is lost
            raise Killed

    interrupted = _student()
    with pytest.raises(Killed):
        train(interrupted, SemanticObjective(_ToyData()), settings, tmp_path / "b", on_epoch=die_after_first)
    assert committed_epochs(tmp_path / "b") == [1]
    resumed = _student(seed=123)  # whatever the fresh model, the checkpoint decides
    outcome = train(resumed, SemanticObjective(_ToyData()), settings, tmp_path / "b")
    assert outcome.resumed_from == 1 and [r.epoch for r in outcome.records] == [2, 3]
    for name, value in _weights(reference).items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert committed_epochs(tmp_path / "b") == [2, 3]  # older checkpoints pruned


def test_damaged_checkpoint_falls_back_to_an_older_one(tmp_path):
    model = _student()
    optimizer = make_optimizer(model, TrainSettings())
    save_checkpoint(tmp_path, 1, model, optimizer)
    with torch.no_grad():
        model.background.add_(1.0)
    save_checkpoint(tmp_path, 2, model, optimizer)
    (tmp_path / "epoch-0002.safetensors").write_bytes(b"garbage")
    fresh = _student(seed=5)
    restored = load_latest(tmp_path, fresh, make_optimizer(fresh, TrainSettings()))
    assert restored.epoch == 1
    assert torch.allclose(fresh.background, model.background - 1.0)
    assert not list(tmp_path.glob(".*.tmp"))


def test_class_weights_weigh_each_pixel_by_its_target_class():
    model = _student()
    data = _ToyData(n=2)
    weights = torch.tensor([0.5, 2.0, 1.0])
    plain, used = SemanticObjective(data).loss(model, [0, 1], 0)
    weighted, _ = SemanticObjective(data, class_weights=weights).loss(model, [0, 1], 0)
    with torch.no_grad():
        logits = model(data.pixels[:2])
    target = data.targets[:2]
    per_pixel = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")
    valid = target >= 0
    w = weights[target.clamp_min(0)] * valid
    assert used == int(valid.sum())
    torch.testing.assert_close(plain.detach(), per_pixel[valid].mean())
    torch.testing.assert_close(weighted.detach(), (per_pixel * w).sum() / w.sum())
