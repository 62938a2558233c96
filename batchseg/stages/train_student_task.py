"""The worker side of `train-student`: one task that trains, checkpoints and saves a student.

Idempotent (DESIGN rule 1): Dask may run it again after a worker died; it resumes
from the newest committed checkpoint, and an epoch it repeats rewrites the same
metrics part. Progress goes to ``_checkpoints/.progress.json`` (rewritten each step,
by rename) for the driver's bar; durable state is only the checkpoints and outputs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch

from batchseg.io.files import write_json_atomic
from batchseg.io.statuses import StudentKind
from batchseg.io.student_files import CHECKPOINTS, MODEL_FILE, save_weights, write_metrics_row
from batchseg.labels.selftrain import balanced_class_weights
from batchseg.models import runtime
from batchseg.models.runtime import set_torch_threads
from batchseg.models.vocabulary import load_classifier
from batchseg.students.data import IGNORE, Augment, SemanticDataset, TrainImage, read_round
from batchseg.students.instance_data import InstanceDataset
from batchseg.students.semantic import SemanticArch, SemanticObjective, SemanticStudent, parameter_count
from batchseg.students.yolact import Yolact, YolactArch
from batchseg.students.yolact_loss import InstanceObjective
from batchseg.students.train import EpochRecord, StepProgress, TrainSettings, train

PROGRESS_FILE = ".progress.json"


@dataclass(frozen=True)
class TrainTask:
    out: Path
    folder: Path  # OUT/students/NAME
    run_id: str
    kind: str
    round_index: int
    source: str
    classes: tuple[str, ...]  # the student's classes, in output order
    class_map: tuple[tuple[int, int], ...]  # label class id -> student output
    classifier_path: Path  # the build's text classifier (label class order)
    label_classes: tuple[str, ...]
    conf_thresh: float
    class_balance: float
    images: tuple[TrainImage, ...]
    arch: SemanticArch | YolactArch
    train: TrainSettings
    augment: Augment
    torch_threads: int | None = None


@dataclass(frozen=True)
class TrainTaskResult:
    records: list[dict]  # epochs trained by this task
    resumed_from: int
    parameters: int
    size_mb: float
    outputs: list[str]  # names of the model's outputs, in order


def _write_progress(folder: Path, state: StepProgress) -> None:
    write_json_atomic(folder / CHECKPOINTS / PROGRESS_FILE, asdict(state))


def _rows_by_image(task: TrainTask) -> dict[str, list[dict]]:
    table = read_round(task.out, task.round_index, task.kind)
    table = table.filter(pc.equal(table.column("source"), task.source))
    rows: dict[str, list[dict]] = {}
    # Painted in segment order so the result does not depend on how parts were written.
    for row in sorted(table.select(["image_id", "segment_id", "class_id", "score", "mask"]).to_pylist(),
                      key=lambda r: (r["image_id"], r["segment_id"])):
        rows.setdefault(row["image_id"], []).append(row)
    return rows


def _semantic(task: TrainTask, device: str) -> tuple[SemanticStudent, SemanticObjective]:
    text = load_classifier(task.classifier_path)
    lowered = [name.lower() for name in task.label_classes]
    rows = torch.stack([text[lowered.index(name.lower())] for name in task.classes])
    torch.manual_seed(task.train.seed)
    model = SemanticStudent(task.arch, rows, task.classes).to(device)
    class_map = dict(task.class_map)
    unlabelled = len(task.classes) if model.extra_background else IGNORE
    dataset = SemanticDataset(list(task.images), _rows_by_image(task), task.arch.input_size, class_map,
                              task.conf_thresh, unlabelled, task.augment, task.train.seed)
    weights = None
    if task.class_balance > 0:
        weights = balanced_class_weights(dataset.class_counts(model.num_outputs), task.class_balance)
    return model, SemanticObjective(dataset, device, weights)


def _instance(task: TrainTask, device: str) -> tuple[Yolact, InstanceObjective]:
    torch.manual_seed(task.train.seed)
    model = Yolact(task.arch, task.classes).to(device)
    dataset = InstanceDataset(list(task.images), _rows_by_image(task), task.arch.input_size, dict(task.class_map),
                              task.conf_thresh, task.augment, task.train.seed)
    return model, InstanceObjective(dataset, device)


def run_train_task(task: TrainTask) -> TrainTaskResult:
    """Train the student to ``task.train.epochs`` epochs (resuming when checkpoints exist) and save it."""
    set_torch_threads(task.torch_threads)
    device = runtime.worker_device()
    checkpoints = task.folder / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    model, objective = (_semantic if task.kind == StudentKind.SEMANTIC else _instance)(task, device)

    def on_epoch(record: EpochRecord) -> None:
        write_metrics_row(task.folder, {"run_id": task.run_id, **asdict(record)})

    outcome = train(model, objective, task.train, checkpoints, on_step=lambda s: _write_progress(task.folder, s),
                    on_epoch=on_epoch)
    outputs = list(task.classes) + (["(background: unlabelled)"] if getattr(model, "extra_background", False) else [])
    path = save_weights(task.folder, model.state_dict(),
                        {"format": "batchseg-student", "kind": task.kind, "outputs": json.dumps(outputs)})
    return TrainTaskResult([asdict(r) for r in outcome.records], outcome.resumed_from, parameter_count(model),
                           path.stat().st_size / 2**20, outputs)


__all__ = ["MODEL_FILE", "PROGRESS_FILE", "TrainTask", "TrainTaskResult", "run_train_task"]
