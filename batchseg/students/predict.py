"""A student applied to decoded images: label rows of the same schema as `pseudolabel` (source ``student``)."""
from __future__ import annotations

import numpy as np
import torch

import torch.nn.functional as F

from batchseg.io.statuses import LabelSource
from batchseg.labels.image_labels import (
    ImageFrame, grid_probs_to_work, instance_rows, label_and_confidence, semantic_rows,
)
from batchseg.students.data import letterbox_tensors, normalise
from batchseg.students.load import LoadedStudent

SOURCE = LabelSource.STUDENT
WORK_MAX_SIDE = 1024  # label maps are made at most this large, then mapped up (as pseudolabel does)


def prepare(pixels: np.ndarray, input_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(H, W, 3)`` uint8 -> ``((3, S, S) float32 normalised, (valid_h, valid_w))``."""
    image, _, valid = letterbox_tensors(pixels, input_size)
    return normalise(image), valid


@torch.inference_mode()
def semantic_probs(student: LoadedStudent, batch: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` normalised -> ``(B, K, S, S)`` float32 class probabilities (softmax)."""
    return student.model(batch.to(student.device)).float().softmax(dim=1).cpu()


def semantic_label_rows(student: LoadedStudent, probs: torch.Tensor, image_id: str, height: int, width: int,
                        valid: tuple[int, int], round_index: int = 0) -> list[dict]:
    """One image's ``(K, S, S)`` probabilities -> semantic label rows in original pixels.

    Pixels won by the student's extra background output (when its vocabulary has no
    "background" class) are left unlabelled, as the labels it learnt from left them.
    """
    frame = ImageFrame.create(image_id, height, width, WORK_MAX_SIDE)
    work = grid_probs_to_work(probs, student.input_size, valid[0], valid[1], frame)
    label, confidence = label_and_confidence(work)
    names = student.classes
    label[label >= len(names)] = -1
    return semantic_rows(frame, label, confidence, names, SOURCE, round_index)


@torch.inference_mode()
def instance_outputs(student: LoadedStudent, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(B, 3, S, S)`` normalised -> the YOLACT student's raw outputs (on the CPU)."""
    return {k: v.float().cpu() for k, v in student.model(batch.to(student.device)).items()}


def instance_label_rows(student: LoadedStudent, outputs: dict[str, torch.Tensor], index: int, image_id: str,
                        height: int, width: int, valid: tuple[int, int], round_index: int = 0) -> list[dict]:
    """Detections of batch item ``index`` (NMS of the student's config) -> instance label rows."""
    from batchseg.students.yolact import detect

    inference = student.config.get("inference") or {}
    found = detect(student.model, outputs, index, nms=inference.get("nms", "fast"),
                   iou_thresh=float(inference.get("nms_thresh", 0.5)))
    frame = ImageFrame.create(image_id, height, width, WORK_MAX_SIDE)
    if found.masks.shape[0] == 0:
        return []
    on_image = found.masks[:, : valid[0], : valid[1]].float()[None]
    work = F.interpolate(on_image, size=(frame.work_h, frame.work_w), mode="nearest-exact")[0] > 0.5
    return instance_rows(frame, work.numpy(), found.class_ids.numpy(), found.scores.numpy(), student.classes,
                         SOURCE, round_index)
