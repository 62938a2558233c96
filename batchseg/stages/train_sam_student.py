"""`batchseg train-student --kind sam-encoder`: distil the build's SAM encoder into a CNN, EdgeSAM's way.

The teacher's outputs are already in the build (``embeddings.zarr`` array ``sam``), so
the teacher encoder never runs. The driver plans (which SAM made the embeddings, and
whether it is still the same; which images; which instance pseudo labels give prompts),
takes the lock (the caller does), runs one training task on one Dask worker and follows
its progress; ``config.json`` goes last and makes ``OUT/students/NAME`` both a finished
student and a SAM model folder that ``embed --sam-model`` loads.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import batchseg
from batchseg.cluster import dask_client, gpu_resources
from batchseg.config import ModelSettings, read_build_file
from batchseg.errors import UsageError
from batchseg.io.build_info import label_rounds
from batchseg.io.statuses import AUTO_SOURCE, ImageStatus, LabelKind, StudentKind
from batchseg.io.store import STORE_NAME, ModelGeometry
from batchseg.io.student_files import STUDENT_FORMAT, student_folder
from batchseg.io.tables import read_manifest
from batchseg.models.specs import SamSpec, check_sam_spec
from batchseg.qc.flags import flagged_image_ids
from batchseg.students.training_set import DistillImage, TrainImage, pick_source, read_round, train_images

if TYPE_CHECKING:  # train_student imports this module lazily; the reverse only for types (the task: torch)
    from batchseg.stages.train_sam_student_task import SamStudentResult
    from batchseg.stages.train_student import TrainStudentConfig


@dataclass(frozen=True)
class SamStudentSummary:
    run_id: str
    folder: Path
    images: int
    epochs: int
    prompt_epochs: int
    resumed_from: int
    final_loss: float | None
    seconds: float
    label_round: int | None = None
    skipped: bool = False
    left_out: int = 0

    def text(self) -> str:
        flagged = (f"left out {self.left_out} images flagged by batchseg qc (--include-flagged to keep them)\n"
                   if self.left_out else "")
        if self.skipped:
            return flagged + f"train-student: {self.folder} is already trained with these settings; nothing to do"
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "-"
        prompts = (f"instance labels of round {self.label_round} and the teacher's masks"
                   if self.label_round is not None else "the teacher's masks")
        return (flagged + f"train-student finished: SAM encoder distilled from the stored embeddings of {self.images} "
                f"images, {self.epochs} epochs ({self.epochs - self.prompt_epochs} encoder-only, {self.prompt_epochs} "
                f"prompt-in-the-loop with prompts from {prompts}){resumed}; final loss {loss}; {self.seconds:.1f} s\n"
                f"outputs: {self.folder} (a SAM model folder: embed into a NEW output folder with "
                f"`batchseg embed SRC NEW_OUT --sam-model {self.folder}`)")


@dataclass(frozen=True)
class _SamPlan:
    teacher: SamSpec
    teacher_sha256: str | None
    geometry: ModelGeometry
    images: tuple[TrainImage, ...]  # (named so the shared settings check reads the image ids)
    distill: tuple[DistillImage, ...]
    round: int | None
    source: str | None
    left_out: int


def plan_sam_student(config: "TrainStudentConfig") -> _SamPlan:
    """The teacher, the images and the prompt labels; ``UsageError`` when the build cannot teach."""
    out = config.out
    build = read_build_file(out)
    if not build or "embed" not in build:
        raise UsageError(f"{out} holds no embeddings; run `batchseg embed SRC {out}` with SAM first")
    models = build["embed"]["models"]
    geometry = ModelGeometry.from_json(build["embed"]["geometry"])
    if models.get("sam") is None or geometry.sam_embed_shape is None:
        raise UsageError(f"{out} holds no SAM embeddings (embed ran with --no-sam); a sam-encoder student learns "
                         "from them: embed with SAM into a build first")
    teacher = SamSpec(**models["sam"])
    check_sam_spec(teacher)
    recorded = (models.get("weights_sha256") or {}).get("sam")
    current = ModelSettings(clip=None, sam=teacher).weights_sha256()["sam"]
    if recorded is not None and current != recorded:
        raise UsageError(f"the SAM that made {out}/{STORE_NAME} ({teacher.model} {teacher.checkpoint or ''}) has "
                         f"changed since (weights {recorded[:19]} then, {(current or 'none')[:19]} now); its stored "
                         "embeddings and its decoder no longer belong together: re-embed, or restore those weights")
    if geometry.sam_image_size % 32:
        raise UsageError(f"the student encoder needs a canvas that is a multiple of 32; the SAM of {out} uses "
                         f"{geometry.sam_image_size}")
    stored: dict[str, tuple[int, int, int]] = {}
    for row in read_manifest(out).to_pylist():
        if (row["status"] == ImageStatus.OK and row["zarr_row"] is not None and row["sam_valid_h"]
                and row["image_id"] not in stored):
            stored[row["image_id"]] = (int(row["zarr_row"]), int(row["sam_valid_h"]), int(row["sam_valid_w"]))
    flagged = frozenset() if config.include_flagged else flagged_image_ids(out) & set(stored)
    ids = set(stored) - flagged
    if not ids:
        raise UsageError(f"{out} has no embedded image to learn from (no ok manifest row with a SAM embedding)")
    images = tuple(train_images(out, ids, config.images))
    distill = tuple(DistillImage(image, *stored[image.image_id]) for image in images)
    round_index, source = _label_round(config)
    return _SamPlan(teacher, recorded, geometry, images, distill, round_index, source, len(flagged))


def _label_round(config: "TrainStudentConfig") -> tuple[int | None, str | None]:
    """Instance pseudo labels for phase-2 prompts: the asked (or last) round, when the build has labels."""
    rounds = label_rounds(config.out)
    if config.round is not None and config.round not in rounds:
        raise UsageError(f"round {config.round} does not exist in {config.out}/labels "
                         f"(rounds: {', '.join(map(str, rounds)) or 'none'})")
    if not rounds:
        if config.source != AUTO_SOURCE:
            raise UsageError(f"{config.out} has no labels, so no '{config.source}' labels to take prompts from")
        return None, None
    round_index = rounds[-1] if config.round is None else config.round
    table = read_round(config.out, round_index, LabelKind.INSTANCE)
    if table.num_rows == 0:
        if config.source != AUTO_SOURCE:
            raise UsageError(f"round {round_index} has no instance labels to take prompts from")
        return round_index, None
    return round_index, pick_source(table, config.source)


def train_sam_student(config: "TrainStudentConfig", run_id: str, progress: bool, started: float
                      ) -> SamStudentSummary:
    """Plan, train (or resume, or skip) and finish the sam-encoder student ``config.name``."""
    from batchseg.stages.train_student import _check_settings, _follow

    plan = plan_sam_student(config)
    folder = student_folder(config.out, config.name)
    if config.overwrite and folder.exists():
        shutil.rmtree(folder)
    phase2 = config.phase2_epochs
    if _check_settings(folder, config, plan):
        return SamStudentSummary(run_id, folder, len(plan.distill), 0, 0, 0, None, time.perf_counter() - started,
                                 plan.round, skipped=True, left_out=plan.left_out)
    from batchseg.models.sam_folder import write_folder_config
    from batchseg.stages.train_sam_student_task import SamStudentTask, run_sam_student_task

    threads = config.cluster.torch_threads
    if threads is None and not (config.cluster.scheduler or config.cluster.gpus):
        threads = config.cluster.threads_per_worker()
    task = SamStudentTask(out=config.out, folder=folder, run_id=run_id, teacher=plan.teacher, images=plan.distill,
                          label_round=plan.round if plan.source else None, label_source=plan.source,
                          arch=config.arch, train=config.train, phase1_epochs=config.train.epochs - phase2,
                          prompts=config.prompts, torch_threads=threads)
    with dask_client(config.cluster, config.out) as client:
        future = client.submit(run_sam_student_task, task, key=f"train-student-{run_id}",
                               resources=gpu_resources(config.cluster), pure=False)
        result = _follow(future, folder, config.train, progress)
    write_folder_config(folder, result.section, _student_config(config, plan, result, run_id))
    last = result.records[-1]["loss"] if result.records else None
    return SamStudentSummary(run_id, folder, len(plan.distill), config.train.epochs, phase2, result.resumed_from,
                             last, time.perf_counter() - started, plan.round if plan.source else None,
                             left_out=plan.left_out)


def _student_config(config: "TrainStudentConfig", plan: _SamPlan, result: "SamStudentResult", run_id: str) -> dict:
    """The student keys of ``config.json`` (the SAM model section is added next to them)."""
    return {
        "format": STUDENT_FORMAT,
        "kind": StudentKind.SAM_ENCODER,
        "name": config.name,
        "architecture": config.arch.to_json(),
        "input_size": result.section["image_size"],
        "embed_shape": list(plan.geometry.sam_embed_shape),
        "teacher": {"sam": asdict(plan.teacher), "weights_sha256": plan.teacher_sha256},
        "learnt_from": {"build": str(config.out.resolve()), "images": len(plan.distill),
                        "label_round": plan.round if plan.source else None, "label_source": plan.source},
        "train": config.train.to_json(),
        "prompt_epochs": config.phase2_epochs,
        "prompts": config.prompts.to_json(),
        "parameters": result.parameters,
        "size_mb": result.size_mb,
        "run_id": run_id,
        "batchseg_version": batchseg.__version__,
        "usage": "a SAM model folder: batchseg embed SRC NEW_OUT --sam-model THIS_FOLDER",
    }
