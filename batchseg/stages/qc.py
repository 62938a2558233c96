"""`batchseg qc`: outlier scores and near-duplicates from the stored global CLIP embeddings.

Reads ``OUT/embeddings.zarr`` (``clip_global``) and the manifest, never the images, and
writes ``OUT/qc/part-*.parquet`` (one row per current file, ``batchseg.io.qc_table``),
the fitted model beside it and a run record. Steps:

1. plan (``qc_plan``): which files have no row from the current model;
2. gather: stream every embedded image's global embedding from the store in chunks,
   unit-normalise it into a private float32 memory-mapped file ``OUT/qc/_work-RUN.f32``
   (deleted at the end) and accumulate the D x D moments for the PCA;
3. fit (first run or ``--refit``): reduction and detectors on a seeded sample of at
   most ``fit_sample`` images (``batchseg.qc.model``);
4. score the new images in chunks and search near-duplicates of the new images
   against all images, blocked (``batchseg.qc.duplicates``);
5. write one part with the new rows (``--refit``: all rows, then older parts go).

Runs in the driver process: the work is a few matrix products over an (N, D) file
that streams from disk, which a Dask cluster would only add transfers to.
Memory: chunk_rows x D for reading and scoring, D x D moments, fit_sample x D for
fitting, dup_block² floats for the duplicate search, and the new rows themselves
(about 250 bytes per file); the embeddings stay on disk (N x D x 4 bytes).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import batchseg
from batchseg.config import BUILD_FILE, write_json_atomic
from batchseg.errors import UsageError
from batchseg.io.lock import build_lock
from batchseg.io.qc_table import (
    REASON_EXACT_DUPLICATE,
    REASON_NEAR_DUPLICATE,
    REASON_OUTLIER,
    qc_folder,
    read_model_files,
    read_qc,
    remove_parts_except,
    write_model_files,
    write_qc_part,
)
from batchseg.io.store import STORE_NAME, iter_rows, open_array
from batchseg.io.tables import read_manifest, remove_temporaries
from batchseg.qc.duplicates import group_pairs, normalise_rows, similar_pairs
from batchseg.qc.model import QcModel, fit_qc_model
from batchseg.qc.reduction import Moments
from batchseg.qc.settings import METHODS, QcSettings
from batchseg.stages.qc_plan import QcFile, QcPlan, plan_qc

EMBEDDING = "clip_global"
MIN_IMAGES = 5


@dataclass(frozen=True)
class QcConfig:
    """One `batchseg qc` run. ``settings`` holds defaults overridden by the options in
    ``given``; without ``refit`` a stored model's settings win for the others."""

    out: Path
    settings: QcSettings = field(default_factory=QcSettings)
    given: frozenset[str] = frozenset()
    refit: bool = False
    chunk_rows: int = 4096
    dup_block: int = 4096

    def validate(self) -> None:
        if not (self.out / BUILD_FILE).exists():
            raise UsageError(f"{self.out} is not a batchseg build (no {BUILD_FILE}); run `batchseg embed SRC {self.out}` first")
        unknown = self.given - {f.name for f in dataclasses.fields(QcSettings)}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        if self.chunk_rows < 1 or self.dup_block < 1:
            raise UsageError("--chunk-rows and --dup-block must be at least 1")
        self.settings.validate()

    def to_json(self) -> dict:
        return {"out": str(self.out), "settings": self.settings.to_json(), "given": sorted(self.given),
                "refit": self.refit, "chunk_rows": self.chunk_rows, "dup_block": self.dup_block}


@dataclass(frozen=True)
class QcSummary:
    run_id: str
    out: Path
    model_id: str
    fitted: bool  # this run fitted the model (first run or --refit)
    files: int  # current files with embeddings
    new_files: int  # rows written this run
    outliers: int
    near_duplicates: int
    exact_duplicates: int
    flagged: int  # among the rows written this run
    seconds: float
    model_info: dict = field(default_factory=dict)

    def text(self) -> str:
        fit = "fitted a new model" if self.fitted else "scored with the stored model"
        return (
            f"qc finished ({fit} {self.model_id}): {self.new_files} of {self.files} files scored this run; "
            f"{self.outliers} outliers, {self.near_duplicates} near-duplicates, {self.exact_duplicates} exact "
            f"duplicates; {self.flagged} flagged, in {self.seconds:.1f} s\n"
            f"outputs: {qc_folder(self.out)}/part-{self.run_id}.parquet, runs/{self.run_id}.json"
        )


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _effective_settings(config: QcConfig, stored: QcSettings | None) -> QcSettings:
    """Stored settings (or defaults) with the options the user gave applied."""
    base = stored if stored is not None else QcSettings()
    given = {name: getattr(config.settings, name) for name in config.given}
    requested = dataclasses.replace(base, **given)
    requested.validate()
    if stored is not None and not config.refit:
        diffs = stored.differences(requested)
        if diffs:
            raise UsageError(
                f"the qc model in {qc_folder(config.out)} was fitted with other settings:\n  "
                + "\n  ".join(diffs)
                + "\nrerun with --refit to fit and score everything again with the new settings"
            )
    return requested


def _load_model(out: Path) -> QcModel | None:
    parts = read_model_files(out)
    if parts is None:
        return None
    try:
        return QcModel.from_parts(*parts)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"cannot read the qc model in {qc_folder(out)} ({exc}); rerun with --refit") from None


def _record_run(config: QcConfig, run_id: str, status: str, summary: QcSummary | None, error: str | None) -> None:
    import torch

    counts = None
    if summary is not None:
        counts = {k: v for k, v in dataclasses.asdict(summary).items() if k not in ("out", "run_id", "model_info")}
    record = {
        "run_id": run_id,
        "command": "qc",
        "argv": sys.argv,
        "status": status,
        "error": error,
        "config": config.to_json(),
        "versions": {"batchseg": batchseg.__version__, "python": platform.python_version(), "torch": torch.__version__},
        "host": platform.node(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "counts": counts,
        "model": summary.model_info if summary is not None else None,
    }
    runs = config.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(runs / f"{run_id}.json", record)


def run_qc(config: QcConfig, progress: bool = True) -> QcSummary:
    """Run `batchseg qc` on ``config.out``; returns the summary.

    Raises ``UsageError`` for bad input and settings, ``LockedError`` when another run
    holds the folder.
    """
    config.validate()
    run_id = new_run_id()
    with build_lock(config.out):
        try:
            summary = _qc_locked(config, run_id, progress)
        except BaseException as exc:
            _record_run(config, run_id, "failed", None, f"{type(exc).__name__}: {exc}")
            raise
        _record_run(config, run_id, "finished", summary, None)
        return summary


def _gather(out: Path, plan: QcPlan, work: Path, chunk_rows: int, progress: bool) -> tuple[np.memmap, Moments]:
    """Unit-normalised embeddings of every image into a memmap (N, D) float32, and their moments."""
    from tqdm import tqdm

    try:
        dim = int(open_array(out, EMBEDDING).shape[1])
    except KeyError:
        raise UsageError(f"{out / STORE_NAME} has no {EMBEDDING} array: embed with CLIP (without --no-clip)") from None
    unit = np.lib.format.open_memmap(work, mode="w+", dtype=np.float32, shape=(len(plan.image_ids), dim))
    moments = Moments(dim)
    done = 0
    with tqdm(total=len(plan.image_ids), desc="qc read", unit="img", disable=not progress) as bar:
        for rows in iter_rows(out, EMBEDDING, plan.zarr_rows, chunk_rows):
            normalised = normalise_rows(rows)
            unit[done:done + len(rows)] = normalised
            moments.add(normalised)
            done += len(rows)
            bar.update(len(rows))
    return unit, moments


def _score(model: QcModel, unit: np.ndarray, indices: list[int], chunk_rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    scores = {name: np.empty(len(indices)) for name in model.settings.methods}
    outlier = np.zeros(len(indices), dtype=bool)
    for start in range(0, len(indices), chunk_rows):
        chunk = np.asarray(unit[np.asarray(indices[start:start + chunk_rows], dtype=np.int64)])
        chunk_scores = model.score(chunk)
        for name, values in chunk_scores.items():
            scores[name][start:start + len(chunk)] = values
        outlier[start:start + len(chunk)] = model.is_outlier(chunk_scores)
    return scores, outlier


def _near_duplicates(plan: QcPlan, unit: np.ndarray, existing, threshold: float, block: int,
                     progress: bool) -> dict[int, tuple[int, float]]:
    """New image index -> (representative index, similarity) for new images that are near-duplicates.

    Old rows are never rewritten: an old image keeps its stored group, and a new image
    joins the group of the oldest image it connects to.
    """
    from tqdm import tqdm

    index = plan.index
    count = len(plan.image_ids)
    is_new = np.zeros(count, dtype=bool)
    is_new[plan.new_images] = True
    with tqdm(total=len(plan.new_images), desc="qc near-duplicates", unit="img", disable=not progress) as bar:
        i, j, sims = similar_pairs(unit, threshold, plan.new_images if not is_new.all() else None, block, bar.update)
    stored_i, stored_j = [], []
    for row in existing:
        rep = row["near_duplicate_of"]
        if rep is not None and row["image_id"] in index and rep in index:
            stored_i.append(index[row["image_id"]])
            stored_j.append(index[rep])
    order = np.where(is_new, count, 0) + np.arange(count)  # old images first, then manifest order
    groups = group_pairs(count, np.concatenate([i, np.asarray(stored_i, dtype=np.int64)]),
                         np.concatenate([j, np.asarray(stored_j, dtype=np.int64)]),
                         np.concatenate([sims, np.full(len(stored_i), np.nan, dtype=np.float32)]), order)
    result = {}
    for k in plan.new_images:
        rep = int(groups.representative[k])
        if rep != k:
            result[k] = (rep, float(groups.similarity[k]))
    return result


def _qc_locked(config: QcConfig, run_id: str, progress: bool) -> QcSummary:
    started = time.perf_counter()
    out = config.out
    folder = qc_folder(out)
    remove_temporaries(folder)
    stored = None if config.refit else _load_model(out)
    settings = _effective_settings(config, stored.settings if stored is not None else _stored_settings(out))
    manifest = read_manifest(out)
    existing_table = read_qc(out)
    plan = plan_qc(manifest, existing_table, stored.model_id if stored is not None else None)
    if len(plan.image_ids) < MIN_IMAGES:
        raise UsageError(f"qc needs at least {MIN_IMAGES} embedded images, {out} has {len(plan.image_ids)}; "
                         f"run `batchseg embed SRC {out}` on more images first")
    folder.mkdir(parents=True, exist_ok=True)
    model, fitted = stored, False
    rows: list[dict] = []
    near: dict[int, tuple[int, float]] = {}
    scores: dict[str, np.ndarray] = {}
    outlier = np.zeros(0, dtype=bool)
    position: dict[int, int] = {}
    work = folder / f"_work-{run_id}.npy"
    try:
        if plan.new_files:
            unit, moments = _gather(out, plan, work, config.chunk_rows, progress)
            if model is None:
                rng = np.random.default_rng(settings.seed)
                count = len(plan.image_ids)
                sample = np.sort(rng.choice(count, size=min(settings.fit_sample, count), replace=False))
                model = fit_qc_model(moments, np.asarray(unit[sample]), settings)
                write_model_files(out, *model.to_parts())
                fitted = True
            scores, outlier = _score(model, unit, plan.new_images, config.chunk_rows)
            position = {k: p for p, k in enumerate(plan.new_images)}
            existing = [] if fitted else existing_table.select(["image_id", "near_duplicate_of"]).to_pylist()
            near = _near_duplicates(plan, unit, existing, model.settings.dup_threshold, config.dup_block, progress)
            del unit
    finally:
        work.unlink(missing_ok=True)
    index = plan.index
    for file in plan.new_files:
        rows.append(_row(file, index[file.image_id], position, scores, outlier, near, plan, model, run_id))
    if rows or fitted:
        write_qc_part(out, run_id, rows)
    if fitted:
        remove_parts_except(out, run_id)
    model_id = model.model_id if model is not None else "-"
    return QcSummary(
        run_id=run_id,
        out=out,
        model_id=model_id,
        fitted=fitted,
        files=len(plan.files),
        new_files=len(rows),
        outliers=sum(r["outlier"] for r in rows),
        near_duplicates=sum(r["near_duplicate_of"] is not None for r in rows),
        exact_duplicates=sum(r["exact_duplicate_of"] is not None for r in rows),
        flagged=sum(r["flagged"] for r in rows),
        seconds=time.perf_counter() - started,
        model_info=model.info if model is not None else {},
    )


def _stored_settings(out: Path) -> QcSettings | None:
    # Under --refit the stored model is not used, but its settings stay the base that
    # the given options change (so `qc OUT --refit` refits what was fitted before).
    parts = read_model_files(out)
    if parts is None:
        return None
    try:
        return QcSettings.from_json(parts[0]["settings"])
    except (KeyError, TypeError):
        return None


def _row(file: QcFile, k: int, position: dict[int, int], scores: dict[str, np.ndarray], outlier: np.ndarray,
         near: dict[int, tuple[int, float]], plan: QcPlan, model: QcModel, run_id: str) -> dict:
    row = {"image_id": file.image_id, "path": file.path, "outlier": False, "near_duplicate_of": None,
           "similarity": None, "exact_duplicate_of": file.exact_duplicate_of, "flagged": False, "reason": None,
           "model_id": model.model_id, "run_id": run_id}
    for name in METHODS:
        row[f"score_{name}"] = None
    if file.exact_duplicate_of is not None:
        row.update(flagged=True, reason=REASON_EXACT_DUPLICATE)
        return row
    p = position[k]
    for name, values in scores.items():
        row[f"score_{name}"] = float(values[p])
    row["outlier"] = bool(outlier[p])
    if k in near:
        rep, similarity = near[k]
        row.update(near_duplicate_of=plan.image_ids[rep], similarity=None if np.isnan(similarity) else similarity)
    if row["outlier"]:
        row.update(flagged=True, reason=REASON_OUTLIER)
    elif row["near_duplicate_of"] is not None:
        row.update(flagged=True, reason=REASON_NEAR_DUPLICATE)
    return row
