"""batchseg.io.hashing is the one home of SHA-256; its values are stored in build files and must not move."""
from __future__ import annotations

import hashlib
import json
import os

from batchseg.io.hashing import canonical_json, file_sha256, sha256_bytes, sha256_json
from batchseg.stages.export_plan import unit_interval


def test_sha256_bytes_is_the_digest_of_the_concatenation():
    assert sha256_bytes(b"ab", b"", b"c") == hashlib.sha256(b"abc").hexdigest()
    assert sha256_bytes() == hashlib.sha256().hexdigest()


def test_sha256_json_is_the_digest_of_sorted_json():
    value = {"b": [1, 2], "a": {"y": 1, "x": None}}
    assert canonical_json(value) == json.dumps(value, sort_keys=True).encode()
    assert sha256_json(value) == hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def test_file_sha256_reads_a_rewritten_file_again(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"one")
    assert file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    stat = path.stat()
    path.write_bytes(b"two")  # same size; force the same mtime, as a coarse clock could
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path, cache=False) == hashlib.sha256(b"two").hexdigest()


def test_unit_interval_keeps_its_values():
    digest = hashlib.sha256(b"7:abc").digest()
    assert unit_interval(7, "abc") == int.from_bytes(digest[:8], "big") / 2.0**64
