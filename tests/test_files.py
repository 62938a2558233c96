"""The one atomic-write helper (batchseg.io.files): whole files or the old file, never a temporary left."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchseg.io.files import (
    atomic_folder,
    atomic_path,
    is_temporary,
    place_image,
    remove_temporaries,
    remove_temporaries_under,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent


class Boom(Exception):
    pass


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_appears_whole_and_only_at_the_end(tmp_path):
    final = tmp_path / "sub" / "data.bin"  # the folder is created
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and is_temporary(tmp)
        tmp.write_bytes(b"x" * 1000)
        assert not final.exists()  # nothing under the final name until the block ends
    assert final.read_bytes() == b"x" * 1000
    assert _names(final.parent) == ["data.bin"]


@pytest.mark.parametrize("fsync", [False, True])
def test_a_failure_inside_the_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path, fsync):
    final = tmp_path / "data.json"
    final.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(final, fsync=fsync) as tmp:
            tmp.write_text("half a new fi")
            raise Boom
    assert final.read_text() == "old"
    assert _names(tmp_path) == ["data.json"]


def test_a_block_that_writes_nothing_fails_and_keeps_the_old_file(tmp_path):
    final = tmp_path / "data.json"
    final.write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic_path(final):
            pass
    assert final.read_text() == "old" and _names(tmp_path) == ["data.json"]


def test_write_helpers_replace_the_file(tmp_path):
    path = tmp_path / "f"
    write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_text_atomic(path, "é\n", fsync=True)
    assert path.read_text(encoding="utf-8") == "é\n"
    write_json_atomic(path, {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'  # indent 2, sorted, final newline
    write_json_atomic(path, {"p": tmp_path}, default=str)
    assert json.loads(path.read_text()) == {"p": str(tmp_path)}
    assert _names(tmp_path) == ["f"]


def test_a_value_json_cannot_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and _names(tmp_path) == ["f.json"]


def test_place_image_links_and_copies_through_the_same_helper(tmp_path):
    source = tmp_path / "a.jpg"
    source.write_bytes(b"jpeg")
    dest = tmp_path / "out"
    assert place_image(source, dest / "link.jpg", "link") and os.readlink(dest / "link.jpg") == str(source)
    assert place_image(source, dest / "copy.jpg", "copy") and (dest / "copy.jpg").read_bytes() == b"jpeg"
    assert _names(dest) == ["copy.jpg", "link.jpg"]


def test_atomic_folder_swaps_whole_folders(tmp_path):
    final = tmp_path / "report"
    with atomic_folder(final) as tmp:
        (tmp / "index.html").write_text("one")
    assert _names(final) == ["index.html"] and (final / "index.html").read_text() == "one"
    with pytest.raises(Boom):
        with atomic_folder(final) as tmp:
            (tmp / "index.html").write_text("two")
            (tmp / "extra").write_text("x")
            raise Boom
    assert _names(final) == ["index.html"] and (final / "index.html").read_text() == "one"
    with atomic_folder(final) as tmp:
        (tmp / "new.html").write_text("three")
    assert _names(final) == ["new.html"]
    assert _names(tmp_path) == ["report"]  # neither the new nor the old folder left behind


def test_remove_temporaries_flat_and_under(tmp_path):
    (tmp_path / "deep").mkdir()
    for path in (tmp_path / ".a.parquet.1234abcd.tmp", tmp_path / "deep" / ".b.json.0000ffff.tmp"):
        path.write_text("half")
    (tmp_path / "keep.tmp").write_text("not hidden")
    (tmp_path / ".hidden").write_text("not a temporary")
    assert remove_temporaries(tmp_path) == 1
    assert remove_temporaries_under(tmp_path) == 1
    assert _names(tmp_path) == [".hidden", "deep", "keep.tmp"] and _names(tmp_path / "deep") == []
    assert remove_temporaries(tmp_path / "missing") == 0 and remove_temporaries_under(tmp_path / "missing") == 0


def test_files_and_hashing_are_import_light():
    code = ("import sys, batchseg.io.files, batchseg.io.hashing\n"
            "print(sorted(m for m in ('torch', 'zarr', 'PIL', 'numpy', 'pyarrow') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_writes_its_own_temporary_and_rename():
    """Every temp-then-rename goes through batchseg.io.files (issue 8: one home)."""
    offenders = []
    for path in sorted((ROOT / "batchseg").rglob("*.py")):
        if path.name == "files.py" and path.parent.name == "io":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "os.replace(" in line or ".replace(path)" in line or "os.rename(" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_hashlib_is_used_only_by_the_hashing_module():
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "batchseg").rglob("*.py"))
                 if path.name != "hashing.py" and "import hashlib" in path.read_text()]
    assert offenders == []
