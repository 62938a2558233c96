"""Helpers shared by the CLI tests."""
from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np
import zarr
from click.testing import CliRunner, Result

from batchseg.cli import cli
from batchseg.io.tables import read_manifest
from batchseg.testing import TinyModels
from batchseg.world import write_world

VOLATILE = ("mtime", "shard", "run_id", "zarr_row")


def embed_args(src: Path, out: Path, models: TinyModels, *extra: str) -> list[str]:
    return [
        "embed", str(src), str(out),
        "--clip-model", models.clip_option, "--canvas", "64",
        "--sam-model", "tiny", "--sam-checkpoint", str(models.sam_checkpoint),
        "--precision", "fp32", "--batch-size", "2", "--shard-size", "3", "--quiet",
        *extra,
    ]


def run_cli(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def manifest_rows(out: Path) -> list[dict]:
    """Manifest rows sorted by path, without the fields that differ between equal runs."""
    rows = read_manifest(out).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rows), key=lambda r: (r["path"], r["status"]))


def arrays_by_image(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Stored arrays keyed by image id (row numbers may legitimately differ between runs)."""
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    result = {}
    for row in read_manifest(out).to_pylist():
        if row["status"] == "ok":
            result[row["image_id"]] = {name: np.asarray(group[name][row["zarr_row"]]) for name in group.array_keys()}
    return result


def assert_same_build(a: Path, b: Path) -> None:
    assert manifest_rows(a) == manifest_rows(b)
    arrays_a, arrays_b = arrays_by_image(a), arrays_by_image(b)
    assert arrays_a.keys() == arrays_b.keys()
    for image_id in arrays_a:
        for name in arrays_a[image_id]:
            np.testing.assert_array_equal(arrays_a[image_id][name], arrays_b[image_id][name], err_msg=f"{name} {image_id}")
    group_a = zarr.open_group(str(a / "embeddings.zarr"), mode="r")
    group_b = zarr.open_group(str(b / "embeddings.zarr"), mode="r")
    assert {k: group_a[k].shape for k in group_a.array_keys()} == {k: group_b[k].shape for k in group_b.array_keys()}
    leftovers = [p for p in a.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


@contextmanager
def example_module(name: str) -> Iterator[ModuleType]:
    """Import ``examples/NAME.py`` (not a package) for the length of a test module."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


# A pipeline of every stage on a small world (tiny random-init models): tests/test_build.py.
BUILD_PIPELINE = """\
sources: world/images
out: build
models:
  clip-model: local-dir:{clip}
  canvas: 64
  sam-model: tiny
  sam-checkpoint: {sam}
  precision: fp32
cluster:
  workers: 1
  threads: 1
retrain: fraction
retrain-fraction: 0.5
embed:
  batch-size: 2
  shard-size: 3
qc:
  threshold: 1000000000.0   # random models: flag nothing, so every image is labelled
  dup-threshold: 1.0
pseudolabel:
  vocab: world/classes.txt
  background: true
  rounds: 1
  epochs: 1
  points-per-side: 4
  pred-iou-thresh: 0
  stability-thresh: 0
  stop-agreement: 1
  shard-size: 3
evaluate:
  gt: world/gt
train-student:
  - name: s
    epochs: {epochs}
    width: 16
    depth: 1
    input-size: 32
    batch-size: 2
    conf-thresh: 0
export:
  - dest: coco
    format: coco
    images: none
report:
  per-class: 1
"""


def write_build_root(root: Path, tiny_models, images: int = 6, epochs: int = 2) -> Path:
    write_world(root / "world", images, seed=11, max_side=80)
    (root / "p.yaml").write_text(BUILD_PIPELINE.format(clip=tiny_models.clip_dir, sam=tiny_models.sam_checkpoint,
                                                       epochs=epochs))
    return root / "p.yaml"


def run_build(pipeline: Path, scheduler: str | None, *extra: str) -> Result:
    return run_cli(["build", str(pipeline), *(["--scheduler", scheduler] if scheduler else []), *extra])
