"""Content hashes, the one home of SHA-256 in batchseg: of bytes, of files, of JSON-able values.

Identity in batchseg is content, not names: an image is the SHA-256 of its bytes
(:func:`batchseg.io.images.content_id`), a model or checkpoint file is the SHA-256 of its
bytes, a settings record is the SHA-256 of its canonical JSON, and a composite identity
(a model folder, a fitted QC model) is the SHA-256 of its parts in order. Every value here
is written into build files and compared on reruns, so none of them may change.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def sha256_bytes(*parts: bytes) -> str:
    """Hex SHA-256 of the concatenation of ``parts`` (fed in order, never joined in memory)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def file_sha256(path: str | Path, cache: bool = True) -> str:
    """Hex SHA-256 of a file's bytes, streamed in 1 MiB blocks.

    Cached per process by (resolved path, size, mtime), so asking again for an unchanged
    multi-GB checkpoint costs a stat, while a file rewritten in place is hashed anew.
    ``cache=False`` always reads the file (an integrity check of a file just written).
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache:
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


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes: sorted keys, unknown types via ``str``."""
    return json.dumps(value, sort_keys=True, default=str).encode()


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of ``value`` as :func:`canonical_json`."""
    return sha256_bytes(canonical_json(value))
