"""The files of a trained student, ``OUT/students/NAME/``, written atomically.

    model.safetensors        weights (the frozen text classifier included), no pickle
    config.json              architecture, classes, input size, normalisation, what it learnt from;
                             written last: a folder without it holds no finished student
    metrics/part-*.parquet   one row per epoch (a Parquet dataset folder: parts only)
    _checkpoints/            per-epoch checkpoints of an unfinished or resumable training
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchseg.errors import UsageError
from batchseg.io.files import atomic_path, write_json_atomic
from batchseg.io.hashing import file_sha256
from batchseg.io.tables import SCHEMA_NAME_KEY, SCHEMA_VERSION_KEY, write_part_atomic

if TYPE_CHECKING:  # torch is imported where weights are read or written: planning needs only the files
    import torch

STUDENTS = "students"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS = "metrics"
CHECKPOINTS = "_checkpoints"
STUDENT_FORMAT = 1

METRICS_VERSION = 1
METRICS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("epoch", pa.int32()),  # 1-based
        pa.field("loss", pa.float64()),  # mean training loss over the epoch's steps
        pa.field("steps", pa.int32()),
        pa.field("images", pa.int32()),
        pa.field("targets_used", pa.int64()),  # labelled pixels (semantic) or objects (instance) learnt from
        pa.field("lr", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("images_per_second", pa.float64()),
    ]
).with_metadata({SCHEMA_NAME_KEY: b"student_metrics", SCHEMA_VERSION_KEY: str(METRICS_VERSION).encode()})


def student_folder(out: Path, name: str) -> Path:
    return out / STUDENTS / name


def write_metrics_row(folder: Path, row: dict[str, Any]) -> Path:
    """One epoch's row as its own part; rewriting an epoch (after a crash) replaces its part."""
    table = pa.Table.from_pylist([row], schema=METRICS_SCHEMA)
    return write_part_atomic(table, folder / METRICS / f"part-epoch-{int(row['epoch']):04d}.parquet")


def save_weights(folder: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = folder / MODEL_FILE
    with atomic_path(path, fsync=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    return write_json_atomic(folder / CONFIG_FILE, config)


def read_student_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a finished student, its weights file checked readable (its header, not the
    tensors: no torch); a clear ``UsageError`` for anything else."""
    config_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if not folder.is_dir():
        raise UsageError(f"student folder {folder} does not exist; train one with `batchseg train-student`")
    if not config_path.exists() or not model_path.exists():
        raise UsageError(f"{folder} holds no finished student ({CONFIG_FILE} and {MODEL_FILE}); "
                         "rerun the train-student command to finish it")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{config_path} is not readable JSON: {exc}") from None
    if config.get("format") != STUDENT_FORMAT:
        raise UsageError(f"{config_path} has student format {config.get('format')!r}; this batchseg reads "
                         f"{STUDENT_FORMAT}: retrain it with this version")
    from safetensors import safe_open

    try:
        with safe_open(str(model_path), framework="numpy"):
            pass
    except Exception as exc:  # noqa: BLE001 - any damage to the file is the same user-facing problem
        raise UsageError(f"cannot read {model_path}: {exc}") from None
    return config


def read_student(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, weights)`` of a finished student; a clear ``UsageError`` for anything else."""
    from safetensors.torch import load_file

    config = read_student_config(folder)
    model_path = folder / MODEL_FILE
    try:
        weights = load_file(str(model_path))
    except Exception as exc:  # noqa: BLE001 - any damage to the file is the same user-facing problem
        raise UsageError(f"cannot read {model_path}: {exc}") from None
    return config, weights


def model_digest(folder: Path) -> str:
    """SHA-256 of the student's weights: its identity in the outputs it labels."""
    return file_sha256(folder / MODEL_FILE)
