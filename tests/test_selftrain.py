"""Self-training head: shapes, frozen classifier, learning, ignores, determinism, save/load."""
from __future__ import annotations

import math
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from batchseg.errors import ModelLoadError, UsageError
from batchseg.labels.maskclip import dense_logits
from batchseg.labels.selftrain import (
    SegHead,
    balanced_class_weights,
    SelfTrainSettings,
    load_head,
    predict_probs,
    save_head,
    train_head,
)

C, D, CS, G, GC = 4, 32, 32, 16, 8  # classes, clip/text dim, SAM channels, SAM grid, clip grid


def classifier(seed: int = 0, classes: int = C) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(classes, D, generator=gen), dim=1)


def make_head(with_sam: bool, seed: int = 0, hidden: int = 32) -> SegHead:
    return SegHead(classifier(), CS if with_sam else None, D, hidden, 50.0, seed=seed)


def separable_data(with_sam: bool, n: int = 16, ignore: float = 0.2):
    """Random features; class = sign pattern of two channels of the head-grid features.

    Returns (sam (n,CS,G,G) | None, clip (n,D,GC,GC), target (n,grid,grid) with ~ignore
    fraction set to -1, truth (n,grid,grid) without ignores).
    """
    gen = torch.Generator().manual_seed(123)
    clip = torch.randn(n, D, GC, GC, generator=gen)
    sam = torch.randn(n, CS, G, G, generator=gen) if with_sam else None
    src = sam if sam is not None else clip
    truth = 2 * (src[:, 0] > 0).long() + (src[:, 1] > 0).long()
    target = truth.clone()
    target[torch.rand(truth.shape, generator=gen) < ignore] = -1
    return sam, clip, target, truth


def batcher(sam, clip, target, batch_size: int = 8):
    """batches(epoch): a deterministic per-epoch shuffle, as the stage does."""

    def batches(epoch: int):
        order = torch.randperm(clip.shape[0], generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield (None if sam is None else sam[idx]), clip[idx], target[idx]

    return batches


def weights(head: SegHead) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in head.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAST = SelfTrainSettings(epochs=3, batch_size=8, lr=1e-2, hidden=32)


@pytest.mark.parametrize("with_sam", [True, False])
def test_shapes_and_dtypes(with_sam):
    head = make_head(with_sam)
    sam, clip, _, _ = separable_data(with_sam, n=3)
    grid = G if with_sam else GC
    assert SegHead.grid(None if sam is None else sam.shape, clip.shape) == grid
    logits = head(sam, clip)
    assert logits.shape == (3, C, grid, grid) and logits.dtype == torch.float32
    assert float(logits.detach().abs().max()) <= 50.0 + 1e-3
    # float16 inputs (as stored) are cast inside
    half = predict_probs(head, None if sam is None else sam.half(), clip.half())
    probs = predict_probs(head, sam, clip)
    assert half.dtype == probs.dtype == torch.float32 and not probs.requires_grad
    assert torch.allclose(probs.sum(1), torch.ones(3, grid, grid), atol=1e-5)
    assert torch.allclose(half, probs, atol=1e-2)


def test_wrong_branch_is_refused():
    sam, clip, _, _ = separable_data(True, n=1)
    with pytest.raises(ValueError, match="without a SAM branch"):
        make_head(False)(sam, clip)
    with pytest.raises(ValueError, match="with a SAM branch"):
        make_head(True)(None, clip)


@pytest.mark.parametrize("with_sam", [True, False])
def test_untrained_head_scores_like_maskclip(with_sam):
    """The zero-initialised correction makes round 1 start from raw MaskCLIP scores."""
    head = make_head(with_sam)
    sam, clip, _, _ = separable_data(with_sam, n=2)
    grid = G if with_sam else GC
    up = F.interpolate(clip, size=(grid, grid), mode="bilinear", align_corners=False)
    expected = torch.stack([dense_logits(x, classifier(), temperature=50.0) for x in up])
    assert torch.allclose(head(sam, clip), expected, atol=1e-4)


def test_classifier_is_frozen():
    head = make_head(True)
    before = head.classifier.clone()
    names = [n for n, _ in head.named_parameters()]
    assert "classifier" not in names and "classifier" not in head.state_dict()
    assert all(p is not head.classifier for p in head.parameters())
    sam, clip, target, _ = separable_data(True)
    train_head(head, batcher(sam, clip, target), FAST)
    assert torch.equal(head.classifier, before)


@pytest.mark.parametrize("with_sam", [True, False])
def test_learns_a_separable_problem(with_sam):
    head = make_head(with_sam)
    sam, clip, target, truth = separable_data(with_sam)
    seen: list[tuple[int, float]] = []
    settings = SelfTrainSettings(epochs=25, batch_size=8, lr=1e-2, hidden=32)
    report = train_head(head, batcher(sam, clip, target), settings, progress=lambda e, l: seen.append((e, l)))
    assert len(report.losses) == 25 and [e for e, _ in seen] == list(range(25))
    assert report.steps == 25 * 2
    assert report.pixels_used == 25 * int((target >= 0).sum())
    assert report.losses[-1] < 0.5 * report.losses[0]
    pred = predict_probs(head, sam, clip).argmax(1)
    labelled = target >= 0
    acc = float((pred[labelled] == truth[labelled]).float().mean())
    assert acc > 0.9, acc


def test_all_ignore_batches_change_nothing():
    head = make_head(True)
    sam, clip, target, _ = separable_data(True, n=8)
    before = weights(head)
    report = train_head(head, batcher(sam, clip, torch.full_like(target, -1)), FAST)
    assert report.steps == 0 and report.pixels_used == 0
    assert all(math.isnan(x) for x in report.losses)
    assert same_weights(weights(head), before)

    # Interleaving all-ignore batches must not take optimiser steps (AdamW's weight
    # decay and momentum would otherwise still move the weights).
    def plain(epoch):
        yield sam[:4], clip[:4], target[:4]
        yield sam[4:], clip[4:], target[4:]

    def padded(epoch):
        yield sam[:4], clip[:4], target[:4]
        yield sam[:4], clip[:4], torch.full_like(target[:4], -1)
        yield sam[4:], clip[4:], target[4:]

    a, b = make_head(True), make_head(True)
    ra, rb = train_head(a, plain, FAST), train_head(b, padded, FAST)
    assert same_weights(weights(a), weights(b)) and ra.steps == rb.steps == 6
    assert ra.losses == rb.losses


def test_ignored_pixels_do_not_contribute():
    """Changing only the features' labels at ignored pixels cannot matter: the loss
    equals cross-entropy over the labelled pixels alone."""
    head = make_head(False)
    _, clip, target, truth = separable_data(False, n=4, ignore=0.5)
    logits = head(None, clip).detach()
    mask = target >= 0
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[mask], truth[mask])
    report = train_head(make_head(False), lambda e: iter([(None, clip, target)]), SelfTrainSettings(epochs=1))
    assert report.pixels_used == int(mask.sum())
    assert report.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_same_seed_same_weights():
    sam, clip, target, _ = separable_data(True)
    runs = []
    for _ in range(2):
        head = make_head(True, seed=7)
        train_head(head, batcher(sam, clip, target), FAST)
        runs.append(weights(head))
    assert same_weights(runs[0], runs[1])
    other = make_head(True, seed=8)
    train_head(other, batcher(sam, clip, target), FAST)
    assert not same_weights(runs[0], weights(other))


def test_training_leaves_the_global_rng_alone():
    sam, clip, target, _ = separable_data(False, n=4)
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    train_head(make_head(False), batcher(sam, clip, target), SelfTrainSettings(epochs=1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("with_sam", [True, False])
def test_save_load_round_trip(tmp_path, with_sam):
    head = make_head(with_sam)
    sam, clip, target, _ = separable_data(with_sam, n=8)
    train_head(head, batcher(sam, clip, target), FAST)
    path = save_head(head, tmp_path / "round=1" / "head.safetensors")
    assert path.exists() and path.with_suffix(".json").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.json", "head.safetensors"]
    loaded = load_head(path, classifier())
    assert torch.equal(predict_probs(loaded, sam, clip), predict_probs(head, sam, clip))
    # Open vocabulary: the same head scores another class list of the same width.
    other = load_head(path, classifier(seed=5, classes=7))
    assert predict_probs(other, sam, clip).shape[1] == 7


def test_load_refuses_bad_heads(tmp_path):
    path = save_head(make_head(False), tmp_path / "head.safetensors")
    with pytest.raises(ModelLoadError, match="32-dim"):
        load_head(path, torch.randn(C, D + 1))
    path.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_head(path, classifier())
    path.with_suffix(".json").unlink()
    with pytest.raises(UsageError, match="config"):
        load_head(path, classifier())


def test_bad_targets_are_refused():
    head = make_head(False)
    _, clip, target, _ = separable_data(False, n=2)
    for bad, match in [
        (target.float(), "integer"),
        (target[:, :4], "must be"),
        (target.clone().fill_(C), r"\[0, 4\)"),
        (target.clone().fill_(-2), "ignore"),
    ]:
        with pytest.raises(ValueError, match=match):
            train_head(head, lambda e, t=bad: iter([(None, clip, t)]), SelfTrainSettings(epochs=1))


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", 2.0),
        ("epochs", True),
        ("batch_size", -1),
        ("hidden", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("lr", "0.1"),
        ("weight_decay", -1e-4),
        ("weight_decay", float("inf")),
        ("temperature", 0),
        ("seed", -1),
        ("seed", 1.5),
        ("conf_thresh", 1.5),
        ("conf_thresh", -0.1),
        ("class_balance", 1.5),
        ("class_balance", -0.5),
    ],
)
def test_bad_settings(field, value):
    settings = SelfTrainSettings(**{field: value})
    with pytest.raises(UsageError, match=f"self-training {field} must be"):
        settings.validate()
    with pytest.raises(UsageError):
        train_head(make_head(False), lambda e: iter([]), settings)


def test_default_settings_are_valid():
    SelfTrainSettings().validate()
    SelfTrainSettings(conf_thresh=0.0, weight_decay=0, seed=0).validate()


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_balanced_class_weights(power):
    counts = torch.tensor([900.0, 90.0, 10.0, 0.0])
    w = balanced_class_weights(counts, power)
    assert w.dtype == torch.float32 and w[3] == 0.0
    assert float((w * counts).sum()) == pytest.approx(float(counts.sum()), rel=1e-5)  # pixel mean 1
    for a, b in ((0, 1), (1, 2)):  # w_a / w_b = (n_a / n_b) ** -power
        assert float(w[a] / w[b]) == pytest.approx(float(counts[a] / counts[b]) ** -power, rel=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        balanced_class_weights(torch.tensor([1.0, -1.0]), power)


def test_class_weights_enter_the_loss():
    """Epoch loss = cross-entropy weighted per class, as F.cross_entropy(weight=...) defines it;
    all-ones weights change nothing."""
    head = make_head(False)
    _, clip, target, truth = separable_data(False, n=4, ignore=0.5)
    logits = head(None, clip).detach()
    mask = target >= 0
    w = torch.tensor([4.0, 1.0, 0.5, 2.0])
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[mask], truth[mask], weight=w)
    one_batch = lambda e: iter([(None, clip, target)])  # noqa: E731
    report = train_head(make_head(False), one_batch, SelfTrainSettings(epochs=1), class_weights=w)
    assert report.losses[0] == pytest.approx(float(expected), rel=1e-5)
    plain, ones = make_head(False), make_head(False)
    train_head(plain, one_batch, FAST)
    train_head(ones, one_batch, FAST, class_weights=torch.ones(C))
    assert same_weights(weights(plain), weights(ones))
    with pytest.raises(ValueError, match="class_weights"):
        train_head(make_head(False), one_batch, FAST, class_weights=torch.ones(C + 1))


def test_ema_head_is_the_average_of_the_steps(tmp_path):
    """With ema_decay the trained head equals a hand-computed EMA of its per-step weights."""
    torch.manual_seed(0)
    classifier = torch.randn(3, 8)
    snapshots = []

    def batches(epoch):
        gen = torch.Generator().manual_seed(epoch)
        for _ in range(3):
            yield None, torch.randn(2, 8, 4, 4, generator=gen), torch.randint(0, 3, (2, 4, 4), generator=gen)

    settings = SelfTrainSettings(epochs=2, ema_decay=0.9, lr=1e-2)
    plain = SegHead(classifier, None, 8, 16, 10.0, seed=1)
    train_head(plain, batches, dataclasses.replace(settings, ema_decay=None),
               progress=lambda e, loss: snapshots.append(None))
    # Recompute: replay the same optimisation, recording weights after every step.
    replay = SegHead(classifier, None, 8, 16, 10.0, seed=1)
    params = [p for p in replay.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        replay.train()
        step = 0
        for epoch in range(settings.epochs):
            for sam, clip, target in batches(epoch):
                loss = torch.nn.functional.cross_entropy(replay(sam, clip), target, ignore_index=-1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                decay = min(0.9, (1 + step) / (10 + step))
                ema = [decay * e + (1 - decay) * p.detach() for e, p in zip(ema, params)]
                step += 1
    averaged = SegHead(classifier, None, 8, 16, 10.0, seed=1)
    train_head(averaged, batches, settings)
    for got, want, last in zip([p for p in averaged.parameters() if p.requires_grad], ema, params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b) for a, b in zip(ema, params))  # the average is not the last step
    for a, b in zip(plain.parameters(), params):
        torch.testing.assert_close(a, b)  # without EMA: the last step, as the replay


@pytest.mark.parametrize("field, value", [("class_quantile", 1.0), ("ema_decay", -0.1), ("stop_agreement", 0.0),
                                          ("teacher_rounds", 0), ("warm_start", "yes")])
def test_new_selftrain_settings_are_validated(field, value):
    with pytest.raises(UsageError, match=field):
        SelfTrainSettings(**{field: value}).validate()


def test_ensemble_probs_is_the_mean_of_each_heads_probabilities():
    from batchseg.stages.pseudolabel_shard import ensemble_probs

    sam, clip, target, _ = separable_data(True, n=4)
    heads = [make_head(True, seed=s) for s in range(3)]
    for head in heads[1:]:
        train_head(head, batcher(sam, clip, target), FAST)  # differ from the untrained first one
    each = [predict_probs(head, sam, clip) for head in heads]
    mean = ensemble_probs(heads, sam, clip)
    assert torch.allclose(mean, (each[0] + each[1] + each[2]) / 3, atol=1e-6)
    assert torch.allclose(mean.sum(1), torch.ones_like(mean[:, 0]), atol=1e-5)
    assert torch.equal(ensemble_probs(heads[:1], sam, clip), each[0])
    assert not torch.allclose(mean, each[2], atol=1e-3)
