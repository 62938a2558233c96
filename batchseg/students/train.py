"""The training loop shared by the students: seeded, checkpointed each epoch, resumable.

Everything random is a function of the seed: the model's initialisation (the caller
builds it under ``torch.manual_seed``), the epoch's image order and each sample's
augmentation (``numpy`` generators keyed by (seed, epoch[, image])), and torch's own
RNG, which is saved in the checkpoint. The learning rate is a pure function of the
global step (linear warm-up, cosine decay), so no scheduler state is needed. Hence
a run killed after epoch ``e`` and started again ends with the same weights as one
that was never interrupted.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from batchseg.students.checkpoint import load_latest, save_checkpoint
from batchseg.students.settings import TrainSettings  # noqa: F401  (torch-free home; re-exported)

# Test hook: after committing this epoch's checkpoint, write a marker and stall, so a
# test can SIGKILL the whole command at a known point (see tests/test_train_student.py).
PAUSE_ENV = "BATCHSEG_TEST_PAUSE_AFTER_EPOCH"
PAUSE_MARKER = ".paused"


class Objective(Protocol):
    """What the loop trains on: a dataset plus the student's loss."""

    def __len__(self) -> int: ...

    def order(self, epoch: int) -> np.ndarray: ...

    def loss(self, model: torch.nn.Module, indices: list[int], epoch: int) -> tuple[Tensor, int]:
        """Mean loss of a batch (scalar tensor) and how many targets (pixels or objects) it used."""
        ...


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based: the number of finished epochs
    loss: float  # mean over the epoch's steps
    steps: int
    images: int
    targets_used: int
    lr: float  # at the epoch's last step
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class StepProgress:
    epoch: int
    epochs: int
    step: int  # global step
    total_steps: int
    loss: float
    images_per_second: float


@dataclass(frozen=True)
class TrainOutcome:
    records: tuple[EpochRecord, ...]  # the epochs trained by this call
    resumed_from: int  # finished epochs found in the checkpoint folder (0: fresh start)
    seconds: float


def learning_rate(settings: TrainSettings, step: int, total_steps: int) -> float:
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def train(model: torch.nn.Module, objective: Objective, settings: TrainSettings, checkpoints: Path,
          on_step: Callable[[StepProgress], None] | None = None,
          on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainOutcome:
    """Train ``model`` from its latest checkpoint in ``checkpoints`` (or from scratch) to ``settings.epochs``.

    ``on_epoch`` runs after an epoch and before its checkpoint is committed (write the
    epoch's metrics there: a crash in between repeats the epoch, and the write with it).
    """
    started = time.perf_counter()
    optimizer = make_optimizer(model, settings)
    restored = load_latest(checkpoints, model, optimizer)
    first = restored.epoch if restored else 0
    steps_per_epoch = math.ceil(len(objective) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    records = []
    model.train()
    for epoch in range(first, settings.epochs):
        tick = time.perf_counter()
        order = [int(i) for i in objective.order(epoch)]
        losses, used, lr = [], 0, settings.lr
        for step_in_epoch, start in enumerate(range(0, len(order), settings.batch_size)):
            step = epoch * steps_per_epoch + step_in_epoch
            lr = learning_rate(settings, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, count = objective.loss(model, order[start : start + settings.batch_size], epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            used += count
            if on_step is not None:
                done = min(len(order), start + settings.batch_size)
                on_step(StepProgress(epoch + 1, settings.epochs, step + 1, total_steps, losses[-1],
                                     done / max(1e-9, time.perf_counter() - tick)))
        seconds = time.perf_counter() - tick
        record = EpochRecord(epoch + 1, float(np.mean(losses)), len(losses), len(order), used, lr, seconds,
                             len(order) / seconds if seconds > 0 else 0.0)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
        save_checkpoint(checkpoints, epoch + 1, model, optimizer)
        _maybe_pause(checkpoints, epoch + 1)
    model.eval()
    return TrainOutcome(tuple(records), first, time.perf_counter() - started)


def _maybe_pause(checkpoints: Path, epoch: int) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if wanted and int(wanted) == epoch:
        (checkpoints / PAUSE_MARKER).write_text(f"paused after epoch {epoch}, pid {os.getpid()}\n")
        time.sleep(3600)
