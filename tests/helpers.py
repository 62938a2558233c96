"""Helpers shared by the CLI tests."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np
import zarr
from click.testing import CliRunner, Result

from batchseg.cli import cli
from batchseg.io.tables import labels_table, read_manifest, round_folder, write_part_atomic
from batchseg.labels.rle import encode_mask, rle_area, rle_bbox_xywh
from batchseg.testing import TinyModels
from batchseg.world import CLASS_NAMES, render_sample, write_world

VOLATILE = ("mtime", "shard", "run_id", "zarr_row")


def embed_args(src: Path, out: Path, models: TinyModels, *extra: str) -> list[str]:
    return [
        "embed", str(src), str(out),
        "--clip-model", models.clip_option, "--canvas", "64",
        "--sam-model", "tiny", "--sam-checkpoint", str(models.sam_checkpoint),
        "--precision", "fp32", "--batch-size", "2", "--shard-size", "3", "--quiet",
        *extra,
    ]


def sam_free_pipeline(folder: Path, sections: str) -> Path:
    """A pipeline file ``folder/p.yaml`` over an empty ``folder/images`` (no SAM), with ``sections``
    after the models section (line 5 on)."""
    (folder / "images").mkdir(exist_ok=True)
    path = folder / "p.yaml"
    path.write_text("sources: images\nout: build\nmodels:\n  no-sam: true\n" + sections)
    return path


def parsed_options(command: str, argv: list[str], leave_out: set[str] = frozenset()) -> dict:
    """What click hands ``batchseg COMMAND argv`` as keyword values, without ``leave_out``
    and the cluster options (``leave_out`` names the arguments that are not options)."""
    from batchseg.cli import cli
    from batchseg.cluster import OPTION_FIELDS

    with cli.commands[command].make_context(command, argv) as ctx:
        given = dict(ctx.params)
    return {name: value for name, value in given.items() if name not in {*leave_out, "cluster", *OPTION_FIELDS}}


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


class InlineFuture:
    """A task :class:`InlineClient` ran to the end when it was submitted."""

    def __init__(self, key: str | None, call) -> None:
        self.key = key
        try:
            self._result, self._error = call(), None
        except Exception as exc:  # noqa: BLE001 - handed back by result(), as Dask does
            self._result, self._error = None, exc

    def done(self) -> bool:
        return True

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        pass


class InlineClient:
    """Runs each submitted task at once, in the test's own thread: what a worker would see
    (its device, a torch function mode) is then the test's to set."""

    def submit(self, fn, *args, key: str | None = None, resources=None, pure=None, **kwargs) -> InlineFuture:
        return InlineFuture(key, lambda: fn(*args, **kwargs))


def run_tasks_inline(monkeypatch, *stage_modules: ModuleType) -> None:
    """Make the stages of ``stage_modules`` run their Dask tasks in this thread (:class:`InlineClient`)."""
    import distributed

    @contextmanager
    def inline_client(settings, build):
        yield InlineClient()

    for module in stage_modules:
        monkeypatch.setattr(module, "dask_client", inline_client)
    monkeypatch.setattr(distributed, "as_completed", iter)  # gather_with_progress: the futures are all done


def ground_truth_instance_rows(out: Path, world: Path) -> None:
    """Replace round 0's labels of ``labelled_build`` (a copy) with instance rows made from the world's
    exact objects (its labels have none: it was embedded without SAM)."""
    rows = []
    for row in read_manifest(out).to_pylist():
        index = int(Path(row["path"]).stem.split("_")[1])
        sample = render_sample(11, index, max_side=80)
        for segment, obj in enumerate(sample.objects):
            rle = encode_mask(obj.mask)
            rows.append({"image_id": row["image_id"], "kind": "instance", "segment_id": segment,
                         "class_id": obj.class_id, "class_name": CLASS_NAMES[obj.class_id], "score": 0.9,
                         "source": "sam", "round": 0, "bbox": list(rle_bbox_xywh(rle)), "area": rle_area(rle),
                         "mask": rle})
    folder = round_folder(out, 0)
    shutil.rmtree(folder)
    write_part_atomic(labels_table(rows), folder / "part-00000.parquet")
