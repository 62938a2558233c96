"""Export a trained student for deployment: ONNX (onnxruntime, any language) or TorchScript.

The exported graph takes what a deployer has after letterboxing, and does the rest::

    pixels  float32 (B, 3, S, S)  RGB in 0..255, longest side resized to S, padded bottom/right with 0
    ->
    probs   float32 (B, K, S, S)  class probabilities (softmax over the K outputs of config.json)

The batch dimension is dynamic. Normalisation (``config.json``'s mean/std) is part of
the graph, so no preprocessing constant can be got wrong downstream.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from batchseg.choices import STUDENT_EXPORT_FORMATS
from batchseg.errors import UsageError
from batchseg.io.files import atomic_path
from batchseg.io.statuses import StudentKind
from batchseg.students.data import PIXEL_MEAN, PIXEL_STD
from batchseg.students.load import LoadedStudent, load_student

OPSET = 17
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class DeployedSemantic(nn.Module):
    """``(B, 3, S, S)`` 0..255 RGB -> ``(B, K, S, S)`` probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model((pixels - self.mean) / self.std).softmax(dim=1)


def deployable(student: LoadedStudent) -> nn.Module:
    if student.kind != StudentKind.SEMANTIC:
        raise UsageError(f"export supports semantic students; this one is {student.kind}")
    return DeployedSemantic(student.model).eval()


def export_student(folder: Path, fmt: str, output: Path | None = None) -> Path:
    """Write the student of ``folder`` as ``fmt``; returns the file (default: next to its weights)."""
    if fmt not in STUDENT_EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(STUDENT_EXPORT_FORMATS)}, got {fmt!r}")
    student = load_student(folder)
    module = deployable(student)
    size = student.input_size
    example = torch.zeros(2, 3, size, size)
    path = output or folder / f"model{SUFFIX[fmt]}"
    with atomic_path(path) as tmp, torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        if fmt == "onnx":
            try:
                import onnx  # noqa: F401 - the exporter needs it; say so plainly when it is missing
            except ImportError:
                raise UsageError("ONNX export needs the onnx package: pip install onnx") from None
            # The TorchScript-based exporter: it needs no onnxscript and keeps the batch axis symbolic.
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["pixels"], output_names=["probs"],
                              dynamic_axes={"pixels": {0: "batch"}, "probs": {0: "batch"}})
        else:
            torch.jit.trace(module, example).save(str(tmp))
    return path
