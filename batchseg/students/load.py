"""Load a finished student folder (``config.json`` + ``model.safetensors``) as a model, never unpickling."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from batchseg.errors import UsageError
from batchseg.io.statuses import StudentKind
from batchseg.io.student_files import MODEL_FILE, model_digest, read_student  # noqa: F401  (model_digest: re-exported)


@dataclass(frozen=True)
class LoadedStudent:
    model: torch.nn.Module  # eval mode, on ``device``
    config: dict
    device: str

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config["classes"])

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])


def build_student(config: dict, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    kind = config.get("kind")
    if kind == StudentKind.SEMANTIC:
        from batchseg.students.semantic import load_semantic

        return load_semantic(config, weights)
    if kind == StudentKind.INSTANCE:
        from batchseg.students.yolact import load_yolact

        return load_yolact(config, weights)
    if kind == StudentKind.SAM_ENCODER:
        raise UsageError("this student is a distilled SAM encoder, not a labeller: it is a SAM model folder, used "
                         "as `batchseg embed SRC NEW_OUT --sam-model STUDENT_FOLDER`")
    raise UsageError(f"unknown student kind {kind!r} in its config.json")


def load_student(folder: Path, device: str = "cpu") -> LoadedStudent:
    config, weights = read_student(folder)
    try:
        model = build_student(config, weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{folder} does not hold a loadable student: {type(exc).__name__}: {exc}") from None
    return LoadedStudent(model.to(device).eval().requires_grad_(False), config, device)


_CACHE: dict[tuple[str, float, str], LoadedStudent] = {}
_LOCK = threading.Lock()


def cached_student(folder: Path, device: str) -> LoadedStudent:
    """One loaded copy per worker process (reloaded when the weights file changes)."""
    key = (str(folder), (folder / MODEL_FILE).stat().st_mtime, device)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load_student(folder, device)
        return _CACHE[key]
