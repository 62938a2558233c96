"""What `batchseg build` remembers between runs: one fingerprint per stage.

A stage's fingerprint is a hash of its settings and of the listing (name, size,
mtime) of the files it reads and writes. The build stores it in
``OUT/_build_state.json`` after the stage finished; a later run whose fingerprint is
the same has nothing to do for that stage and skips it without loading a model or
starting a cluster. Anything that changes a stage's inputs or outputs (new label parts,
another vocabulary, a manual `batchseg pseudolabel` run, a run killed half-way, whose
state was never stored) changes the fingerprint, and the stage runs: its own
incremental logic then computes only what is missing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from batchseg.io.files import write_json_atomic
from batchseg.io.hashing import sha256_json

STATE_FILE = "_build_state.json"


def listing(root: Path, patterns: Iterable[str] = ("**/*",)) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ns) of the files under ``root`` matching ``patterns``;
    hidden names (temporaries, locks) are left out. A missing root lists nothing."""
    if not root.exists():
        return []
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    found = {}
    for pattern in patterns:
        for path in root.glob(pattern):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            st = path.stat()
            found[rel.as_posix()] = (rel.as_posix(), st.st_size, st.st_mtime_ns)
    return sorted(found.values())


def fingerprint(settings: Any, files: dict[str, list]) -> str:
    """Hash of a stage's settings (JSON-able) and file listings."""
    return sha256_json({"settings": settings, "files": files})


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_stage(out: Path, stage: str, value: dict[str, Any]) -> None:
    """Record ``value`` (its fingerprint and what the build needs next time) for ``stage``."""
    state = read_state(out)
    state.setdefault("stages", {})[stage] = value
    write_json_atomic(out / STATE_FILE, state, default=str)


def stage_state(out: Path, stage: str) -> dict[str, Any]:
    return read_state(out).get("stages", {}).get(stage, {})
