"""Per-epoch training checkpoints: tensors in safetensors, the rest in JSON, never pickle.

A checkpoint of epoch ``e`` (the number of finished epochs) is two files in the
checkpoint folder::

    epoch-000e.safetensors   model weights ("model.*"), optimizer tensors ("optim.*"), torch RNG state
    epoch-000e.json          epoch, optimizer hyper-parameters and scalar state, the weights file's SHA-256

Both are written to hidden temporary names, fsynced and renamed; the JSON goes last
and is the commit marker: a checkpoint without its JSON, or whose weights do not
match the recorded hash, does not exist. Loading reads tensors with safetensors and
plain JSON, so a checkpoint file from anywhere cannot run code.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from batchseg.io.files import atomic_path, remove_temporaries, write_json_atomic
from batchseg.io.hashing import file_sha256

FORMAT = 1
_NAME = re.compile(r"^epoch-(\d{4,})\.json$")
KEEP = 2  # committed checkpoints kept; older ones are removed after a new commit


@dataclass(frozen=True)
class Checkpoint:
    epoch: int  # finished epochs
    extra: dict[str, Any]  # caller's JSON data (e.g. metrics so far)


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in info["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(folder: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any] | None = None) -> Path:
    """Commit the state after ``epoch`` finished epochs; returns the JSON marker's path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"epoch-{epoch:04d}"
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_tensors, optim_info = _split_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    weights = folder / f"{stem}.safetensors"
    with atomic_path(weights, fsync=True) as tmp:
        save_file(tensors, str(tmp))
    marker = folder / f"{stem}.json"
    info = {"format": FORMAT, "epoch": epoch, "weights": weights.name, "sha256": file_sha256(weights, cache=False),
            "optimizer": optim_info, "extra": extra or {}}
    write_json_atomic(marker, info, fsync=True)
    _prune(folder, epoch)
    return marker


def _prune(folder: Path, newest: int) -> None:
    for epoch in committed_epochs(folder)[:-KEEP]:
        if epoch < newest:
            (folder / f"epoch-{epoch:04d}.json").unlink(missing_ok=True)
            (folder / f"epoch-{epoch:04d}.safetensors").unlink(missing_ok=True)
    remove_temporaries(folder)


def committed_epochs(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def load_latest(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint | None:
    """Restore the newest intact checkpoint into ``model`` and ``optimizer`` (and torch's RNG).

    Returns ``None`` when there is none. A checkpoint whose weights are missing or do
    not match the recorded hash (a crash between the two renames cannot cause that,
    but a damaged disk can) is skipped in favour of an older one.
    """
    for epoch in reversed(committed_epochs(folder)):
        try:
            info = json.loads((folder / f"epoch-{epoch:04d}.json").read_text())
            weights = folder / info["weights"]
            if info.get("format") != FORMAT or not weights.exists() or file_sha256(weights, cache=False) != info["sha256"]:
                continue
        except (OSError, ValueError, KeyError):
            continue
        tensors = load_file(str(weights))
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(_join_optimizer(tensors, info["optimizer"]))
        torch.set_rng_state(tensors["rng.torch"])
        return Checkpoint(epoch=int(info["epoch"]), extra=info.get("extra") or {})
    return None
