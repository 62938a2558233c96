"""Content hashes: one helper for files (weights, checkpoints) and one for JSON-able values.

Identity in batchseg is content, not names: an image is the SHA-256 of its bytes
(:func:`batchseg.io.images.content_id`), a model file is the SHA-256 of its bytes here,
and a settings record is the SHA-256 of its canonical JSON.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, streamed in 1 MiB blocks.

    Cached per process by (resolved path, size, mtime), so asking again for an unchanged
    multi-GB checkpoint costs a stat, while a file rewritten in place is hashed anew.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        cached = _FILE_HASHES.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    with _LOCK:
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of ``value`` as canonical JSON (sorted keys; unknown types via ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
