"""`batchseg train-student`: train a deployable student on a round's pseudo labels.

The driver plans (which round, source, classes and images; clear errors when there
is nothing to learn), takes the build's lock, and runs the training as one task on
one Dask worker (its GPU when it has one). The task trains from the latest committed
checkpoint, writes one metrics part per epoch and the final weights; the driver
follows its progress through a small file the task rewrites each step, and writes
``config.json`` last: a student folder with a ``config.json`` is finished.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

import batchseg
from batchseg.cluster import dask_client, gpu_resources
from batchseg.config import read_build_file
from batchseg.io.files import write_json_atomic
from batchseg.errors import BatchsegError, UsageError
from batchseg.io.build_info import label_rounds
from batchseg.io.lock import build_lock
from batchseg.io.statuses import StudentKind
from batchseg.qc.flags import flagged_image_ids
from batchseg.io.student_files import CHECKPOINTS, CONFIG_FILE, MODEL_FILE, STUDENT_FORMAT, student_folder, write_config
from batchseg.io.runs import recorded_run
from batchseg.choices import BACKGROUND
from batchseg.students.settings import PIXEL_MEAN, PIXEL_STD, TrainSettings
from batchseg.students.training_set import pick_source, read_round, train_images
from batchseg.stages.train_student_options import TrainStudentConfig  # noqa: F401  (re-exported; its home is light)

if TYPE_CHECKING:  # the task module (torch) is imported where the training runs
    from batchseg.stages.train_student_task import TrainTaskResult

SETTINGS_FILE = "_settings.json"


@dataclass(frozen=True)
class TrainStudentSummary:
    run_id: str
    folder: Path
    round: int
    source: str
    images: int
    epochs: int
    resumed_from: int
    final_loss: float | None
    seconds: float
    skipped: bool = False
    left_out: int = 0  # images flagged by batchseg qc, not learnt from

    def text(self) -> str:
        flagged = (f"left out {self.left_out} images flagged by batchseg qc (--include-flagged to keep them)\n"
                   if self.left_out else "")
        return flagged + self._text()

    def _text(self) -> str:
        if self.skipped:
            return f"train-student: {self.folder} is already trained with these settings; nothing to do"
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "-"
        return (f"train-student finished: {self.images} images of round {self.round} ({self.source} labels), "
                f"{self.epochs} epochs{resumed}; final loss {loss}; {self.seconds:.1f} s\n"
                f"outputs: {self.folder}/{MODEL_FILE}, {CONFIG_FILE}, metrics/part-*.parquet")


@dataclass(frozen=True)
class _Plan:
    round: int
    source: str
    label_classes: tuple[str, ...]
    student_classes: tuple[str, ...]
    class_map: tuple[tuple[int, int], ...]
    classifier_path: Path
    images: tuple
    rows: int
    left_out: int = 0  # labelled images left out because `batchseg qc` flagged them


def _vocabulary(out: Path) -> tuple[tuple[str, ...], Path]:
    build = read_build_file(out)
    label_info = (build or {}).get("pseudolabel")
    if not label_info:
        raise UsageError(f"{out} has no pseudo labels; run `batchseg pseudolabel {out} --classes ...` first")
    classes = tuple(label_info["labels"]["classes"])
    classifier = out / label_info["text_classifier"]
    if not classifier.exists():
        raise UsageError(f"the text classifier {classifier} is missing; rerun `batchseg pseudolabel {out} ...`")
    return classes, classifier


def plan_training(config: TrainStudentConfig) -> _Plan:
    """Which labels and images the student learns from; ``UsageError`` when that is nothing."""
    out = config.out
    label_classes, classifier = _vocabulary(out)
    rounds = label_rounds(out)
    if not rounds:
        raise UsageError(f"{out} has no label rounds; run `batchseg pseudolabel {out} --classes ...` first")
    round_index = rounds[-1] if config.round is None else config.round
    if round_index not in rounds:
        raise UsageError(f"round {round_index} does not exist in {out}/labels (rounds: {', '.join(map(str, rounds))})")
    table = read_round(out, round_index, config.kind)
    if table.num_rows == 0:
        raise UsageError(f"empty label set: round {round_index} has no {config.kind} label rows to learn from")
    source = pick_source(table, config.source)
    table = table.filter(pc.equal(table.column("source"), source))
    for pair in table.select(["class_id", "class_name"]).group_by(["class_id", "class_name"]).aggregate([]).to_pylist():
        cid, name = pair["class_id"], pair["class_name"]
        if not (0 <= cid < len(label_classes) and label_classes[cid] == name):
            raise UsageError(f"round {round_index} was labelled with another vocabulary than the build's last "
                             f"pseudolabel run (class id {cid} is {name!r}); rerun pseudolabel")
    if config.classes and len({c.lower() for c in config.classes}) != len(config.classes):
        raise UsageError(f"--classes names a class twice: {', '.join(config.classes)}")
    wanted = config.classes or tuple(c for c in label_classes if config.kind == StudentKind.SEMANTIC or c.lower() != BACKGROUND)
    lowered = {c.lower(): i for i, c in enumerate(label_classes)}
    missing = [c for c in wanted if c.lower() not in lowered]
    if missing:
        raise UsageError(f"the labels do not have class(es) {', '.join(map(repr, missing))}; "
                         f"their vocabulary is: {', '.join(label_classes)}")
    student_classes = tuple(label_classes[lowered[c.lower()]] for c in wanted)
    class_map = {lowered[c.lower()]: i for i, c in enumerate(student_classes)}
    if config.kind == StudentKind.SEMANTIC and BACKGROUND in lowered and BACKGROUND not in {c.lower() for c in student_classes}:
        class_map[lowered[BACKGROUND]] = len(student_classes)  # the learnable extra background output
    kept = table.filter(pc.and_(pc.greater_equal(table.column("score"), config.conf_thresh),
                                pc.is_in(table.column("class_id"), value_set=pa.array(sorted(class_map), type=pa.int32()))))
    if kept.num_rows == 0:
        raise UsageError(f"empty label set: no {source} {config.kind} row of round {round_index} of the chosen classes "
                         f"reaches --conf-thresh {config.conf_thresh}; lower it or choose other classes")
    ids = set(kept.column("image_id").to_pylist())
    flagged = frozenset() if config.include_flagged else flagged_image_ids(out) & ids
    ids -= flagged
    images = train_images(out, ids, config.images)
    if not images:
        raise UsageError(f"none of the {len(ids)} labelled images is an ok manifest row of {out}")
    return _Plan(round_index, source, label_classes, student_classes, tuple(sorted(class_map.items())),
                 classifier, tuple(images), kept.num_rows, len(flagged))


def _check_settings(folder: Path, config: TrainStudentConfig, plan: _Plan) -> bool:
    """Refuse to mix settings in one student folder; True when it is already finished."""
    identity = json.loads(json.dumps({**config.identity(), "round": plan.round, "source": plan.source,
                                      "images": sorted(image.image_id for image in plan.images)}))
    path = folder / CHECKPOINTS / SETTINGS_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != identity:
            changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
            raise UsageError(f"student {folder.name} in {folder.parent} was trained with other settings "
                             f"({', '.join(changed)} differ); pass --overwrite to start over, or choose another --name")
        return (folder / CONFIG_FILE).exists()
    if (folder / CONFIG_FILE).exists():
        raise UsageError(f"{folder} holds a student of unknown settings; pass --overwrite or choose another --name")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, identity)
    return False


def run_train_student(config: TrainStudentConfig, progress: bool = True) -> TrainStudentSummary:
    """Train (or resume, or skip) the student ``config.name`` of build ``config.out``."""
    config.validate()
    started = time.perf_counter()
    with build_lock(config.out), recorded_run(config.out, "train-student", config.to_json()) as run:
        summary = _train_locked(config, run.run_id, progress, started)
        run.add_summary(summary)
        return summary


def _train_locked(config: TrainStudentConfig, run_id: str, progress: bool, started: float) -> TrainStudentSummary:
    if config.kind == StudentKind.SAM_ENCODER:
        from batchseg.stages.train_sam_student import train_sam_student

        return train_sam_student(config, run_id, progress, started)
    plan = plan_training(config)
    folder = student_folder(config.out, config.name)
    if config.overwrite and folder.exists():
        shutil.rmtree(folder)
    if _check_settings(folder, config, plan):
        return TrainStudentSummary(run_id, folder, plan.round, plan.source, len(plan.images), 0, 0, None,
                                   time.perf_counter() - started, skipped=True, left_out=plan.left_out)
    from batchseg.stages.train_student_task import TrainTask, run_train_task

    threads = config.cluster.torch_threads
    if threads is None and not (config.cluster.scheduler or config.cluster.gpus):
        threads = config.cluster.threads_per_worker()
    task = TrainTask(out=config.out, folder=folder, run_id=run_id, kind=config.kind, round_index=plan.round,
                     source=plan.source, classes=plan.student_classes, class_map=plan.class_map,
                     classifier_path=plan.classifier_path, label_classes=plan.label_classes,
                     conf_thresh=config.conf_thresh, class_balance=config.class_balance, images=plan.images,
                     arch=config.arch, train=config.train,
                     augment=config.augment, torch_threads=threads)
    with dask_client(config.cluster, config.out) as client:
        future = client.submit(run_train_task, task, key=f"train-student-{run_id}",
                               resources=gpu_resources(config.cluster), pure=False)
        result = _follow(future, folder, config.train, progress)
    write_config(folder, _student_config(config, plan, result, run_id))
    last = result.records[-1]["loss"] if result.records else None
    return TrainStudentSummary(run_id, folder, plan.round, plan.source, len(plan.images), config.train.epochs,
                               result.resumed_from, last, time.perf_counter() - started, left_out=plan.left_out)


def _follow(future, folder: Path, train: "TrainSettings", progress: bool) -> TrainTaskResult:
    """Wait for the training task, showing its progress (epoch, step, loss, images/s)."""
    from tqdm import tqdm

    from batchseg.stages.train_student_task import PROGRESS_FILE

    progress_path = folder / CHECKPOINTS / PROGRESS_FILE
    with tqdm(total=None, unit="step", desc="train-student", disable=not progress, dynamic_ncols=True) as bar:
        while not future.done():
            time.sleep(0.25)
            try:
                state = json.loads(progress_path.read_text())
            except (OSError, ValueError):
                continue
            bar.total = state["total_steps"]
            bar.n = state["step"]
            bar.set_postfix(epoch=f"{state['epoch']}/{state['epochs']}", loss=f"{state['loss']:.4f}",
                            img_s=f"{state['images_per_second']:.1f}", refresh=False)
            bar.refresh()
    try:
        return future.result()
    except BatchsegError:
        raise
    except Exception as exc:
        raise BatchsegError(f"training failed: {type(exc).__name__}: {exc}") from exc


def _student_config(config: TrainStudentConfig, plan: _Plan, result: TrainTaskResult, run_id: str) -> dict:
    return {
        "format": STUDENT_FORMAT,
        "kind": config.kind,
        "name": config.name,
        "architecture": config.arch.to_json(),
        "classes": list(plan.student_classes),
        "outputs": result.outputs,
        "input_size": config.arch.input_size,
        "normalisation": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD),
                          "rule": "RGB uint8 / 255, minus mean, divided by std"},
        "geometry": "longest side resized to input_size, padded bottom/right with 0 (after normalisation: "
                    "-mean/std) onto a square canvas",
        "learnt_from": {"build": str(config.out.resolve()), "round": plan.round, "source": plan.source,
                        "kind": config.kind, "conf_thresh": config.conf_thresh,
                        "class_balance": config.class_balance,
                        "label_classes": list(plan.label_classes), "label_rows": plan.rows,
                        "images": len(plan.images), "text_classifier": plan.classifier_path.name},
        "train": config.train.to_json(),
        "augment": asdict(config.augment),
        "inference": {"nms": config.nms, "nms_thresh": config.nms_thresh} if config.kind == StudentKind.INSTANCE else None,
        "parameters": result.parameters,
        "size_mb": result.size_mb,
        "run_id": run_id,
        "batchseg_version": batchseg.__version__,
    }
