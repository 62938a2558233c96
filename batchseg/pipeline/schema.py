"""The keys a pipeline file may hold, their types, and their checking.

Key names are the CLI flags of the stage they configure, without the dashes in front
(``shard-size``; ``shard_size`` is accepted too). Every section lists its allowed keys;
an unknown key is an error that names its line and lists them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchseg.choices import (
    DENSE_HEADS, EXPORT_FORMATS, KEY_SMOOTHING, PRECISIONS, QC_FEATURES, QC_METHODS, REGION_VOTES, RETRAIN_POLICIES,
    SAM_MODELS,
)
from batchseg.io.files import IMAGE_MODES
from batchseg.io.statuses import TRAIN_SOURCES, LabelKind, StudentKind, values
from batchseg.students.settings import BLOCK_KINDS, NMS_KINDS
from batchseg.pipeline.yaml_file import KeyPath, YamlDocument

STAGES = ("embed", "qc", "pseudolabel", "evaluate", "train-student", "export", "report")


@dataclass(frozen=True)
class Key:
    """One allowed key: its type (int, float, bool, str, path, choice, strs, pair) and rules."""

    kind: str
    choices: tuple[str, ...] = ()
    required: bool = False


INT, FLOAT, BOOL, STR, PATH, STRS, PAIR = (Key(k) for k in ("int", "float", "bool", "str", "path", "strs", "pair"))


def choice(*names: str, required: bool = False) -> Key:
    return Key("choice", tuple(names), required)


MODELS = {
    "clip-model": STR, "clip-pretrained": STR, "no-clip": BOOL, "canvas": INT, "fine-canvas": INT,
    "sam-model": choice(*SAM_MODELS), "sam-checkpoint": STR, "no-sam": BOOL,
    "precision": choice(*PRECISIONS),
}
CLUSTER = {"workers": INT, "gpus": INT, "threads": INT, "scheduler": STR}
EMBED = {"batch-size": INT, "shard-size": INT, "max-pixels": INT}
QC = {
    "method": choice(*QC_METHODS), "compare": STRS, "contamination": FLOAT, "threshold": FLOAT,
    "dup-threshold": FLOAT, "features": choice(*QC_FEATURES),
    "dup-features": choice(*QC_FEATURES), "max-dim": INT, "fit-sample": INT, "seed": INT,
}
PSEUDOLABEL = {
    "classes": STRS, "vocab": PATH, "templates": PATH, "background": BOOL, "bg-floor": FLOAT,
    "dense-head": choice(*DENSE_HEADS), "proxy-grid": INT, "region-vote": choice(*REGION_VOTES), "bg-mask-vote": BOOL, "fine-weight": FLOAT,
    "pd-thresh": FLOAT, "no-prompt-denoising": BOOL, "key-smoothing": choice(*KEY_SMOOTHING), "no-key-smoothing": BOOL, "sam": BOOL,
    "points-per-side": INT, "pred-iou-thresh": FLOAT, "stability-thresh": FLOAT, "nms-thresh": FLOAT, "work-max-side": INT,
    "rounds": INT, "conf-thresh": FLOAT, "class-balance": FLOAT, "class-quantile": FLOAT, "teacher-rounds": INT,
    "stop-agreement": FLOAT, "ema-decay": FLOAT, "warm-start": BOOL, "anchor": BOOL, "drift-tolerance": FLOAT,
    "ensemble": BOOL, "epochs": INT, "seed": INT,
    "shard-size": INT, "include-flagged": BOOL,
}
EVALUATE = {"gt": Key("path", required=True), "ignore-index": INT, "gt-offset": INT}
STUDENT = {
    "name": Key("str", required=True), "kind": choice(StudentKind.SEMANTIC.value, StudentKind.INSTANCE.value), "round": INT,
    "source": choice(*TRAIN_SOURCES), "classes": STRS, "conf-thresh": FLOAT,
    "class-balance": FLOAT, "blocks": choice(*BLOCK_KINDS), "width": INT,
    "depth": INT, "input-size": INT, "nms": choice(*NMS_KINDS), "nms-thresh": FLOAT, "epochs": INT,
    "batch-size": INT, "lr": FLOAT, "seed": INT, "no-flip": BOOL, "scale-jitter": PAIR, "images": PATH,
    "include-flagged": BOOL,
}
EXPORT = {
    "dest": Key("path", required=True), "format": choice(*EXPORT_FORMATS, required=True), "round": INT,
    "source": STR, "kind": choice(*values(LabelKind)), "min-score": FLOAT, "split": STR, "seed": INT,
    "images": choice(*IMAGE_MODES), "src": PATH, "tolerance": FLOAT, "ignore-value": INT,
}
REPORT = {"round": INT, "source": STR, "per-class": INT, "src": PATH}
TOP = {
    "sources": Key("strs", required=True), "out": Key("path", required=True), "models": Key("section", required=True),
    "cluster": Key("section"), "retrain": choice(*RETRAIN_POLICIES), "retrain-fraction": FLOAT,
    **{stage: Key("section") for stage in STAGES},
}
SECTIONS = {"models": MODELS, "cluster": CLUSTER, "embed": EMBED, "qc": QC, "pseudolabel": PSEUDOLABEL,
            "evaluate": EVALUATE, "train-student": STUDENT, "export": EXPORT, "report": REPORT}
LISTS = ("train-student", "export")  # sections that hold a list of items (one mapping is a list of one)


class Checker:
    """Type-checks sections of one document; relative paths resolve against ``base``
    (the pipeline file's folder), or the working folder for ``--set`` values."""

    def __init__(self, doc: YamlDocument, cwd_keys: frozenset[KeyPath] = frozenset()) -> None:
        self.doc = doc
        self.base = doc.path.resolve().parent
        self.cwd_keys = cwd_keys

    def section(self, where: KeyPath, value: Any, keys: dict[str, Key]) -> dict[str, Any]:
        """The keys given in a mapping, checked and converted, with Python names (``shard_size``).

        ``None`` or ``true`` (``report:`` or ``report: true``) is an empty section."""
        if value is None or value is True:
            value = {}
        if not isinstance(value, dict):
            raise self.doc.error(where, f"must be a mapping of keys ({self.allowed(keys)}), got {_shown(value)}")
        result: dict[str, Any] = {}
        for raw, item in value.items():
            name = str(raw).replace("_", "-")
            if name not in keys:
                what = "unknown stage or key" if where == () else "unknown key"
                raise self.doc.error(where + (raw,), f"{what} {raw!r}; allowed: {self.allowed(keys)}")
            python = name.replace("-", "_")
            if python in result:
                raise self.doc.error(where + (raw,), f"{raw!r} is given twice (as {name} and {python})")
            result[python] = self.value(where + (raw,), item, keys[name])
        for name, key in keys.items():
            if key.required and name.replace("-", "_") not in result:
                raise self.doc.error(where, f"missing required key {name!r}; allowed: {self.allowed(keys)}")
        return result

    @staticmethod
    def allowed(keys: dict[str, Key]) -> str:
        return ", ".join(keys)

    def items(self, where: KeyPath, value: Any, keys: dict[str, Key]) -> list[dict[str, Any]]:
        """A list section (students, exports); one mapping is a list of one."""
        if isinstance(value, dict):
            return [self.section(where, value, keys)]
        if not isinstance(value, list) or not value:
            raise self.doc.error(where, f"must be a list of mappings (keys: {self.allowed(keys)}), got {_shown(value)}")
        return [self.section(where + (index,), item, keys) for index, item in enumerate(value)]

    def value(self, where: KeyPath, value: Any, key: Key) -> Any:
        kind = key.kind
        if kind == "section":
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, str) and value.strip():
            return value
        if kind == "choice" and isinstance(value, bool) and {"on", "off"} <= set(key.choices):
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if kind == "choice" and value in key.choices:
            return value
        if kind == "path" and isinstance(value, str) and value.strip():
            return self.path(where, value)
        if kind == "strs":
            if isinstance(value, str) and value.strip():
                return (value,)
            if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
                return tuple(value)
        if kind == "pair" and isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return (float(value[0]), float(value[1]))
        wanted = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a non-empty string",
                  "path": "a path (string)", "strs": "a string or a list of strings",
                  "pair": "a list of two numbers", "choice": f"one of {', '.join(key.choices)}"}[kind]
        raise self.doc.error(where, f"must be {wanted}, got {_shown(value)}")

    def path(self, where: KeyPath, text: str) -> Path:
        """``text`` as a path; relative ones against the file's folder (``--set``: the working folder)."""
        path = Path(os.path.expanduser(text))
        if path.is_absolute():
            return path
        from_cli = any(where[:cut] in self.cwd_keys for cut in range(1, len(where) + 1))
        return Path(os.path.normpath((Path.cwd() if from_cli else self.base) / path))


def _shown(value: Any) -> str:
    text = repr(value)
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
            type(None): "nothing"}.get(type(value), type(value).__name__)
    return f"{kind} {text[:60]}" if value is not None else "nothing"
