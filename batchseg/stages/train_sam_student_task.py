"""The worker side of `train-student --kind sam-encoder`: distil SAM's encoder, save a SAM model folder.

Idempotent like the other students' task (DESIGN rule 1): it resumes from the newest
committed checkpoint, rewrites the metrics part of an epoch it repeats, and writes the
weights by rename. The teacher's image encoder is never run (its outputs are stored);
only its prompt encoder and mask decoder are loaded, frozen, and copied into the output.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch

from batchseg.io.statuses import LabelKind
from batchseg.io.store import open_array
from batchseg.io.student_files import CHECKPOINTS, MODEL_FILE, write_metrics_row
from batchseg.models import runtime
from batchseg.models.runtime import set_torch_threads
from batchseg.models.sam import PIXEL_MEAN, PIXEL_STD, SAM_ARCHS, SamSpec, load_sam
from batchseg.models.sam_folder import read_section, save_sam_folder, section_for_arch
from batchseg.stages.train_student_task import _write_progress
from batchseg.students.data import read_round
from batchseg.students.edgesam import RepViTSamEncoder, SamStudentArch, parameter_count
from batchseg.students.sam_distill import DistillImage, PromptSettings, SamDistillObjective
from batchseg.students.train import EpochRecord, TrainSettings, train


@dataclass(frozen=True)
class SamStudentTask:
    out: Path
    folder: Path  # OUT/students/NAME
    run_id: str
    teacher: SamSpec  # the SAM whose embeddings the build stores
    images: tuple[DistillImage, ...]
    label_round: int | None  # instance pseudo labels that give phase-2 prompts (None: teacher masks only)
    label_source: str | None
    arch: SamStudentArch
    train: TrainSettings
    phase1_epochs: int
    prompts: PromptSettings
    torch_threads: int | None = None


@dataclass(frozen=True)
class SamStudentResult:
    records: list[dict]
    resumed_from: int
    parameters: int  # of the student encoder
    size_mb: float  # of the whole SAM model folder's weights
    section: dict  # the SAM model folder's config section


def teacher_section(spec: SamSpec) -> dict:
    """The SAM model folder section of the teacher (a registry arch, or a folder's own)."""
    if spec.model in SAM_ARCHS:
        return section_for_arch(SAM_ARCHS[spec.model], PIXEL_MEAN, PIXEL_STD)
    return read_section(Path(spec.model))


def student_section(teacher: dict, arch: SamStudentArch) -> dict:
    """The teacher's section with the student's encoder: same canvas, statistics, embedding, decoder."""
    return {**teacher, "image_encoder": arch.to_json()}


def _label_rows(task: SamStudentTask) -> dict[str, list[dict]]:
    if task.label_round is None or task.label_source is None:
        return {}
    table = read_round(task.out, task.label_round, LabelKind.INSTANCE)
    table = table.filter(pc.equal(table.column("source"), task.label_source))
    rows: dict[str, list[dict]] = {}
    wanted = {item.image.image_id for item in task.images}
    for row in sorted(table.select(["image_id", "segment_id", "bbox", "mask"]).to_pylist(),
                      key=lambda r: (r["image_id"], r["segment_id"])):
        if row["image_id"] in wanted:
            rows.setdefault(row["image_id"], []).append(row)
    return rows


def run_sam_student_task(task: SamStudentTask) -> SamStudentResult:
    """Train the student encoder to ``task.train.epochs`` epochs (resuming) and write the SAM model folder's weights."""
    set_torch_threads(task.torch_threads)
    device = runtime.worker_device()
    checkpoints = task.folder / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    teacher = load_sam(task.teacher, device="cpu")
    teacher.image_encoder = torch.nn.Identity()  # never run: its outputs are stored; free its memory
    teacher = teacher.to(device).eval().requires_grad_(False)
    section = student_section(teacher_section(task.teacher), task.arch)
    torch.manual_seed(task.train.seed)
    student = RepViTSamEncoder(task.arch, section["image_size"], section["embed_dim"], section["embed_grid"]).to(device)
    objective = SamDistillObjective(list(task.images), open_array(task.out, "sam"), teacher, task.phase1_epochs,
                                    task.prompts, _label_rows(task), task.train.seed, device)

    def on_epoch(record: EpochRecord) -> None:
        write_metrics_row(task.folder, {"run_id": task.run_id, **asdict(record)})

    outcome = train(student, objective, task.train, checkpoints, on_step=lambda s: _write_progress(task.folder, s),
                    on_epoch=on_epoch)
    state = {f"image_encoder.{k}": v for k, v in student.state_dict().items()}
    state.update({k: v for k, v in teacher.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))})
    save_sam_folder(state, section, task.folder, write_config=False)
    size = (task.folder / MODEL_FILE).stat().st_size / 2**20
    return SamStudentResult([asdict(r) for r in outcome.records], outcome.resumed_from, parameter_count(student),
                            size, json.loads(json.dumps(section)))
