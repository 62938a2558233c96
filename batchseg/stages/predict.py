"""`batchseg predict STUDENT SRC DEST`: label a folder of images with a trained student.

Finds and hashes images exactly as `embed` does (its plan: ``discover_images`` and
``plan_embed``; unreadable files and duplicates are manifest rows), runs the student
on shards of images on the Dask workers, and writes ``DEST/manifest/part-*.parquet``
and ``DEST/labels/round=0/part-*.parquet`` in the schemas `pseudolabel` writes
(source ``student``), plus a ``batchseg.json`` naming the classes, so `evaluate`,
`export` and later stages read DEST unchanged. Incremental like `embed`: a rerun
labels only new or changed files.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import batchseg
from batchseg.cluster import ClusterSettings, dask_client, gather_with_progress, gpu_resources
from batchseg.config import (
    BUILD_FILE, BUILD_SCHEMA_VERSION, read_build_file, validate_image_job,
)
from batchseg.io.files import remove_temporaries, write_json_atomic
from batchseg.errors import UsageError
from batchseg.io.images import DEFAULT_MAX_PIXELS, discover_images
from batchseg.io.lock import build_lock
from batchseg.io.statuses import ImageStatus, LabelSource
from batchseg.io.student_files import model_digest, read_student_config
from batchseg.io.tables import manifest_table, read_manifest, round_folder, write_part_atomic
from batchseg.io.runs import recorded_run
from batchseg.stages.embed_plan import plan_embed
from batchseg.stages.embed_plan import part_path
from batchseg.stages.predict_shard import LABEL_ROUND, PredictItem, PredictShard, PredictShardResult, run_predict_shard

OUTPUTS = ("manifest", "labels", BUILD_FILE)


@dataclass(frozen=True)
class PredictConfig:
    student: Path  # OUT/students/NAME
    source: Path
    dest: Path
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    batch_size: int = 8
    shard_size: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False

    def validate(self) -> None:
        validate_image_job(self.source, self.dest, "destination", self.batch_size, self.shard_size)
        self.cluster.validate()

    def to_json(self) -> dict:
        return {"student": str(self.student), "source": str(self.source), "dest": str(self.dest),
                "cluster": asdict(self.cluster), "batch_size": self.batch_size, "shard_size": self.shard_size,
                "max_pixels": self.max_pixels, "overwrite": self.overwrite}


@dataclass(frozen=True)
class PredictSummary:
    run_id: str
    dest: Path
    found: int
    computed: int
    ok: int
    failed: int
    skipped: int
    duplicates: int
    rows: int
    seconds: float

    def text(self) -> str:
        return (f"predict finished: {self.ok} labelled, {self.failed} failed, {self.skipped} skipped (unchanged), "
                f"{self.duplicates} duplicates; {self.rows} label rows in {self.seconds:.1f} s\n"
                f"outputs: {self.dest / 'manifest'}, {round_folder(self.dest, LABEL_ROUND)}, runs/{self.run_id}.json")


def _identity(config: PredictConfig, student_config: dict) -> dict:
    return {"student": str(config.student.resolve()), "model_sha256": model_digest(config.student),
            "kind": student_config["kind"], "classes": student_config["classes"]}


def _check_dest(config: PredictConfig, identity: dict) -> None:
    build = read_build_file(config.dest)
    if build is None:
        return
    stored = build.get("predict")
    if stored is None:
        raise UsageError(f"{config.dest} is not a predict output (no 'predict' in {BUILD_FILE}); choose another DEST")
    if stored["model_sha256"] != identity["model_sha256"]:
        raise UsageError(f"{config.dest} holds labels of another student ({stored['student']}); "
                         "pass --overwrite to start over, or choose another DEST")


def _remove_uncommitted(dest: Path) -> None:
    """Label parts of shards whose manifest part never landed (a crash between the two writes)."""
    folder = round_folder(dest, LABEL_ROUND)
    remove_temporaries(folder)
    remove_temporaries(dest / "manifest")
    for part in folder.glob("part-*.parquet"):
        shard_id = part.name[len("part-"):-len(".parquet")]
        if not part_path(dest, shard_id).exists():
            part.unlink()


def run_predict(config: PredictConfig, progress: bool = True) -> PredictSummary:
    config.validate()
    student_config = read_student_config(config.student)
    identity = _identity(config, student_config)
    started = time.perf_counter()
    with build_lock(config.dest), recorded_run(config.dest, "predict", config.to_json()) as run:
        summary = _predict_locked(config, identity, run.run_id, progress, started)
        run.add_summary(summary, leave_out=("dest",))
        return summary


def _predict_locked(config: PredictConfig, identity: dict, run_id: str, progress: bool, started: float) -> PredictSummary:
    dest = config.dest
    if config.overwrite:
        for name in OUTPUTS:
            target = dest / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    _check_dest(config, identity)
    _remove_uncommitted(dest)
    write_json_atomic(dest / BUILD_FILE, {
        "schema_version": BUILD_SCHEMA_VERSION,
        "batchseg_version": batchseg.__version__,
        "predict": identity,
        # evaluate and the later stages read a build's classes from here.
        "pseudolabel": {"labels": {"classes": list(identity["classes"])}, "source": LabelSource.STUDENT},
    })
    manifest = read_manifest(dest)
    try:
        files = discover_images(config.source, exclude=(config.dest,))
    except OSError as exc:
        raise UsageError(f"cannot read source folder {config.source}: {exc}") from None
    plan = plan_embed(files, manifest, run_id)
    results: list[PredictShardResult] = []
    if plan.pending:
        threads = config.cluster.torch_threads
        if threads is None and not (config.cluster.scheduler or config.cluster.gpus):
            threads = config.cluster.threads_per_worker()
        items = [PredictItem(p.image_id, p.found.path, p.found.rel_path, p.found.size, p.found.mtime) for p in plan.pending]
        shards = [
            PredictShard(f"{run_id}-{index:05d}", run_id, dest, config.student.resolve(),
                         tuple(items[i : i + config.shard_size]), config.batch_size, config.max_pixels, threads)
            for index, i in enumerate(range(0, len(items), config.shard_size))
        ]
        with dask_client(config.cluster, dest) as client:
            resources = gpu_resources(config.cluster)
            futures = [client.submit(run_predict_shard, shard, key=f"predict-{shard.shard_id}", resources=resources,
                                     pure=False) for shard in shards]
            results = gather_with_progress(futures, len(items), "predict", progress, lambda r: r.images)
    if plan.recorded_rows:
        write_part_atomic(manifest_table(plan.recorded_rows), part_path(dest, f"{run_id}-driver"))
    ok = sum(r.ok for r in results)
    failed = sum(r.images - r.ok for r in results) + sum(r["status"] != ImageStatus.DUPLICATE for r in plan.recorded_rows)
    return PredictSummary(run_id, dest, plan.found, len(plan.pending), ok, failed, plan.known, plan.duplicates,
                          sum(r.rows for r in results), time.perf_counter() - started)
