"""`batchseg embed`: image folders to Zarr embeddings and a manifest, on a Dask cluster.

The driver plans (what is new), grows the arrays, hands shards to workers and
records the run; workers compute and commit shards (``embed_shard``).

The driver imports torch and the models only when there is work: planning, the
settings check and a rerun with nothing new stay torch-free (issue 8: a no-op rerun
or a refused settings mismatch costs well under a second).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import batchseg
from batchseg.cluster import dask_client, gather_with_progress, gpu_resources
from batchseg.config import BUILD_FILE, BUILD_SCHEMA_VERSION, EmbedConfig, read_build_file
from batchseg.io.files import remove_temporaries, write_json_atomic
from batchseg.errors import UsageError
from batchseg.io.images import discover_images
from batchseg.io.lock import build_lock
from batchseg.io.statuses import ImageStatus
from batchseg.io.store import STORE_NAME, ModelGeometry, ensure_store, store_rows
from batchseg.io.store_integrity import arrays_without_checksums, verify_rows
from batchseg.io.tables import (
    QUARANTINE, manifest_table, quarantine_damaged_parts, read_manifest, write_part_atomic,
)
from batchseg.models.specs import ModelSettings
from batchseg.stages.embed_plan import CURRENT_RUN_FILE, adopt_intact_rows, assign_rows, part_path, plan_embed, shard_items
from batchseg.io.runs import recorded_run

if TYPE_CHECKING:  # torch-heavy: imported where the work is done
    from batchseg.models.runtime import ModelBuilders
    from batchseg.stages.embed_shard import ShardResult

# Outputs that depend on the embeddings; --overwrite removes them, nothing else.
BUILD_OUTPUTS = (STORE_NAME, "manifest", "labels", "qc", "students", BUILD_FILE, CURRENT_RUN_FILE)


@dataclass(frozen=True)
class EmbedSummary:
    run_id: str
    out: Path
    found: int
    computed: int  # unique images sent to the models this run
    ok: int
    failed: int  # images that could not be used (one manifest row each)
    skipped: int  # files unchanged since an earlier run
    duplicates: int
    seconds: float  # whole run, cluster start and model loading included
    shard_seconds: float = 0.0  # from the first shard submitted to the last one committed
    compute_seconds: float = 0.0  # model forward time summed over shards
    verified: int = 0  # stored rows read back by --verify
    damaged: int = 0  # of those, rows missing or failing their checksum
    unrepaired: tuple[str, ...] = ()  # damaged rows still damaged after this run, with why
    unchecked_arrays: tuple[str, ...] = ()  # arrays without checksums (stores made before them)
    quarantined: tuple[str, ...] = ()  # manifest parts --repair moved to OUT/quarantine/
    reused: int = 0  # images --repair matched to intact stored rows instead of computing them

    @property
    def images_per_second(self) -> float:
        """Throughput of the sharded phase (what scales with the dataset)."""
        return self.computed / self.shard_seconds if self.shard_seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"embed finished: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (unchanged), "
            f"{self.duplicates} duplicates; {self.computed} computed in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} images/s once the cluster and models were up)"
        ]
        if self.quarantined:
            lines.append(f"repair: moved {len(self.quarantined)} damaged manifest parts to {self.out / QUARANTINE}: "
                         + ", ".join(self.quarantined) + f"; {self.reused} images kept their intact stored rows")
        if self.verified:
            lines.append(f"verify: {self.verified} stored rows read back, {self.damaged} damaged, "
                         f"{self.damaged - len(self.unrepaired)} recomputed, {len(self.unrepaired)} left damaged")
        if self.unchecked_arrays:
            lines.append(f"verify: {', '.join(self.unchecked_arrays)} carry no checksums (written by an older batchseg): "
                         "missing chunks are found, flipped bytes may not be; --overwrite rewrites them with checksums")
        lines.append(f"outputs: {self.out / STORE_NAME}, {self.out / 'manifest'}, runs/{self.run_id}.json")
        return "\n".join(lines)


def probe_geometry(models: ModelSettings, builders: ModelBuilders) -> ModelGeometry:
    """Load the models on a worker (where they stay cached) and report their shapes."""
    from batchseg.models.runtime import get_models

    return get_models(models, builders).geometry


def probe_models(models: ModelSettings, builders: ModelBuilders) -> tuple[ModelGeometry, dict | None]:
    """Load the models on a worker and report their shapes and the CLIP preprocessing they use."""
    from batchseg.models.runtime import get_models

    loaded = get_models(models, builders)
    clip = loaded.clip
    return loaded.geometry, (clip.preprocess.to_json() if clip is not None else None)


def _check_preprocessing(config: EmbedConfig, build: dict | None, probed: dict | None) -> None:
    """A change of CLIP preprocessing (filter, mean, std, fill) is a change of settings."""
    if build is None or "embed" not in build or probed is None:
        return
    stored = build["embed"].get("preprocessing")
    if stored is None:  # made before it was recorded: bicubic, padded with the mean colour
        from batchseg.models.clip_preprocess import legacy_record

        stored = legacy_record(probed["mean"], probed["std"])
    diffs = [f"{key}: stored {json.dumps(stored.get(key))}, requested {json.dumps(value)}"
             for key, value in probed.items() if stored.get(key) != value]
    if diffs:
        raise UsageError(
            f"{config.out} was embedded with other CLIP preprocessing than the model's preprocess_cfg now gives:\n  "
            + "\n  ".join(diffs) + "\nrerun with --overwrite to start over, or choose a new output folder"
        )


def _start_over(out: Path) -> None:
    for name in BUILD_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _check_build(config: EmbedConfig, build: dict | None) -> ModelGeometry | None:
    """Refuse settings that would mix incompatible embeddings in one build."""
    if build is None or "embed" not in build:
        return None
    stored = build["embed"]
    geometry = ModelGeometry.from_json(stored["geometry"])
    diffs = config.models.differences(stored["models"], geometry.clip_canvas)
    if diffs and config.models.sam is not None and stored["models"].get("sam") is not None:
        mine = config.models.resolved()
        other_sam = mine.to_json()["sam"] != stored["models"]["sam"]
        if "weights_sha256" in stored["models"]:
            other_sam |= mine.weights_sha256()["sam"] != (stored["models"]["weights_sha256"] or {}).get("sam")
        if other_sam:
            raise UsageError(_mixing_message(config, stored["models"]) + "\n  " + "\n  ".join(diffs))
    if diffs:
        raise UsageError(
            f"{config.out} was built with different embedding settings:\n  "
            + "\n  ".join(diffs)
            + "\nrerun with --overwrite to start over, or choose a new output folder"
        )
    return geometry


def _sam_name(sam: dict | None, sha: str | None) -> str:
    if sam is None:
        return "no SAM"
    where = sam["model"] + (f" with {sam['checkpoint']}" if sam.get("checkpoint") else "")
    return f"{where} (weights {sha[:19] if sha else 'random'})"


def _mixing_message(config: EmbedConfig, stored: dict) -> str:
    """Why another SAM's embeddings cannot join a store (e.g. a distilled student's and its teacher's)."""
    mine = config.models.resolved()
    requested = _sam_name(mine.to_json()["sam"], mine.weights_sha256()["sam"])
    held = _sam_name(stored.get("sam"), (stored.get("weights_sha256") or {}).get("sam"))
    return (f"{config.out}/{STORE_NAME} holds SAM embeddings made by {held}; this run asks for {requested}. "
            "Embeddings of two SAM models (say a teacher and its distilled student) cannot be mixed in one "
            "store: embed into a new output folder, or rerun with --overwrite to start over")


def _write_build_file(config: EmbedConfig, geometry: ModelGeometry, preprocessing: dict | None, run_id: str) -> None:
    data = read_build_file(config.out) or {"schema_version": BUILD_SCHEMA_VERSION, "created_by_run": run_id}
    data["batchseg_version"] = batchseg.__version__
    data["embed"] = {"models": config.models.resolved().to_json(), "geometry": geometry.to_json(),
                     "preprocessing": preprocessing}
    write_json_atomic(config.out / BUILD_FILE, data)


def included(files: list, config: EmbedConfig) -> list:
    """The discovered files under ``config.include`` (all of them when it is empty)."""
    if not config.include:
        return files
    source = config.source.resolve()
    prefixes = tuple(folder.resolve().relative_to(source).as_posix() for folder in config.include)
    if "." in prefixes:
        return files
    return [f for f in files if any(f.rel_path == p or f.rel_path.startswith(p + "/") for p in prefixes)]


def run_embed(config: EmbedConfig, builders: ModelBuilders | None = None, progress: bool = True) -> EmbedSummary:
    """Run one `embed` build into ``config.out``; returns the summary.

    Raises ``UsageError`` for bad input and settings, ``LockedError`` when another run
    holds the folder, other ``BatchsegError``/exceptions when the run fails.
    """
    config.validate()
    with build_lock(config.out), recorded_run(config.out, "embed", config.to_json()) as run:
        started = time.perf_counter()
        summary = _embed_locked(config, builders, run.run_id, progress, started)
        run.add_summary(summary, leave_out=("out",))
        return summary


def _stored_images(manifest) -> dict[int, str]:
    """Zarr row -> image id of every row an ``ok`` manifest row points at."""
    rows = manifest.select(["image_id", "status", "zarr_row"]).to_pylist()
    return {r["zarr_row"]: r["image_id"] for r in rows if r["status"] == ImageStatus.OK and r["zarr_row"] is not None}


def _embed_locked(config: EmbedConfig, builders: ModelBuilders | None, run_id: str, progress: bool, started: float) -> EmbedSummary:
    out = config.out
    if config.overwrite:
        _start_over(out)
    geometry = _check_build(config, read_build_file(out))
    remove_temporaries(out / "manifest")
    quarantined = quarantine_damaged_parts(out, out / "manifest") if config.repair else []
    (out / CURRENT_RUN_FILE).write_text(run_id + "\n")

    manifest = read_manifest(out)
    try:
        files = discover_images(config.source, exclude=(config.out,))
    except OSError as exc:
        raise UsageError(f"cannot read source folder {config.source}: {exc}") from None
    stored = _stored_images(manifest)
    damaged = verify_rows(out, stored) if config.verify and store_rows(out) else {}
    plan = plan_embed(included(files, config), manifest, run_id, recompute={stored[row]: row for row in damaged})
    reused = adopt_intact_rows(out, plan.pending, manifest) if config.repair else 0

    results: list[ShardResult] = []
    shard_seconds = 0.0
    if plan.pending:
        if builders is None:
            from batchseg.models.runtime import ModelBuilders

            builders = ModelBuilders()
        with dask_client(config.cluster, out) as client:
            resources = gpu_resources(config.cluster)
            probed, preprocessing = client.submit(probe_models, config.models, builders, resources=resources,
                                                  pure=False).result()
            if geometry is not None and probed != geometry:
                raise UsageError(
                    f"the models now produce {probed} but {out} holds {geometry}; rerun with --overwrite or use a new folder"
                )
            _check_preprocessing(config, read_build_file(out), preprocessing)
            _write_build_file(config, probed, preprocessing, run_id)
            items, rows = assign_rows(plan.pending, manifest, store_rows(out))
            ensure_store(out, probed, rows)
            tick = time.perf_counter()
            results = _run_shards(client, config, builders, run_id, items, resources, progress)
            shard_seconds = time.perf_counter() - tick

    if plan.recorded_rows:
        write_part_atomic(manifest_table(plan.recorded_rows), part_path(out, f"{run_id}-driver"))
    still = verify_rows(out, damaged) if damaged else {}
    ok = sum(r.ok for r in results)
    failed = sum(r.failed for r in results) + sum(r["status"] != ImageStatus.DUPLICATE for r in plan.recorded_rows)
    return EmbedSummary(
        run_id=run_id,
        out=out,
        found=plan.found,
        computed=len(plan.pending) - reused,
        ok=ok,
        failed=failed,
        skipped=plan.known,
        duplicates=plan.duplicates,
        seconds=time.perf_counter() - started,
        shard_seconds=shard_seconds,
        compute_seconds=sum(r.compute_seconds for r in results),
        verified=len(stored) if config.verify else 0,
        damaged=len(damaged),
        unrepaired=tuple(f"row {row} (image {stored[row]}): {why}" for row, why in sorted(still.items())),
        unchecked_arrays=tuple(arrays_without_checksums(out)) if config.verify else (),
        quarantined=tuple(p.name for p in quarantined),
        reused=reused,
    )


def _run_shards(client, config: EmbedConfig, builders: ModelBuilders, run_id: str, items, resources, progress: bool) -> list[ShardResult]:
    # An explicit --threads always applies; otherwise a local cluster splits the cores
    # and an external cluster's workers keep their own setting.
    from batchseg.stages.embed_shard import ShardTask, run_shard

    threads = config.cluster.torch_threads
    if threads is None and not (config.cluster.scheduler or config.cluster.gpus):
        threads = config.cluster.threads_per_worker()
    tasks = [
        ShardTask(
            shard_id=f"{run_id}-{index:05d}",
            run_id=run_id,
            out=config.out,
            items=shard,
            models=config.models,
            builders=builders,
            batch_size=config.batch_size,
            max_pixels=config.max_pixels,
            torch_threads=threads,
        )
        for index, shard in enumerate(shard_items(items, config.shard_size))
    ]
    futures = [
        client.submit(run_shard, task, key=f"embed-{task.shard_id}", resources=resources, pure=False) for task in tasks
    ]
    return gather_with_progress(futures, len(items), "embed", progress, lambda result: result.images)
