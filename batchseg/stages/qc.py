"""`batchseg qc`: outlier scores and near-duplicates from the stored global CLIP embeddings.

Reads ``OUT/embeddings.zarr`` (``clip_global``) and the manifest, never the images, and
writes ``OUT/qc/part-*.parquet`` (one row per current file, ``batchseg.io.qc_table``),
the fitted model beside it and a run record. Steps:

1. plan (``qc_plan``): which files have no row from the current model;
2. gather: stream every embedded image's stored CLIP arrays in chunks, turn them into
   unit feature vectors (``batchseg.qc.features``: the global embedding by default, or
   pooled dense features) in private float32 memory-mapped files
   ``OUT/qc/_work-RUN-FEATURE.npy`` (deleted at the end), and accumulate the D x D
   moments for the PCA;
3. fit (first run or ``--refit``): reduction and detectors on a seeded sample of at
   most ``fit_sample`` images (``batchseg.qc.model``);
4. score the new images in chunks and search near-duplicates of the new images
   against all images, blocked (``batchseg.qc.duplicates``);
5. write one part with the new rows (``--refit``: all rows, then older parts go).

Runs in the driver process: the work is a few matrix products over an (N, D) file
that streams from disk, which a Dask cluster would only add transfers to.
Memory: chunk_rows x D for reading and scoring, D x D moments, fit_sample x D for
fitting, dup_block² floats for the duplicate search, and per file its manifest and qc
rows (ids and paths; measured in bench/qc.py); the embeddings stay on disk
(N x D x 4 bytes, read back through the page cache).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchseg.choices import QC_METHODS
from batchseg.config import BUILD_FILE, read_build_file
from batchseg.io.files import remove_temporaries
from batchseg.errors import UsageError
from batchseg.io.lock import build_lock
from batchseg.io.qc_table import (
    REASON_EXACT_DUPLICATE,
    REASON_NEAR_DUPLICATE,
    REASON_OUTLIER,
    qc_folder,
    qc_table_from_columns,
    read_model_files,
    read_qc,
    remove_parts_except,
    write_model_files,
    write_qc_part,
)
from batchseg.io.store import STORE_NAME, iter_rows, open_array
from batchseg.io.tables import read_manifest
from batchseg.qc.duplicates import group_pairs, similar_pairs
from batchseg.qc.features import STORE_ARRAY, compute_features
from batchseg.qc.model import QcModel, fit_qc_model
from batchseg.qc.reduction import Moments
from batchseg.qc.settings import QcSettings
from batchseg.stages.qc_plan import QcPlan, plan_qc
from batchseg.io.runs import recorded_run

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
        details = ""
        rglasso = self.model_info.get("rglasso") if self.fitted else None
        if rglasso:
            details = (f"rglasso: {rglasso['iterations']} iterations ({rglasso['admm_iterations']} ADMM), "
                       f"{rglasso['criterion']}; reduced dimension {self.model_info['reduced_dim']}\n")
        return details + (
            f"qc finished ({fit} {self.model_id}): {self.new_files} of {self.files} files scored this run; "
            f"{self.outliers} outliers, {self.near_duplicates} near-duplicates, {self.exact_duplicates} exact "
            f"duplicates; {self.flagged} flagged, in {self.seconds:.1f} s\n"
            f"outputs: {qc_folder(self.out)}/part-{self.run_id}.parquet, runs/{self.run_id}.json"
        )


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


def run_qc(config: QcConfig, progress: bool = True) -> QcSummary:
    """Run `batchseg qc` on ``config.out``; returns the summary.

    Raises ``UsageError`` for bad input and settings, ``LockedError`` when another run
    holds the folder.
    """
    config.validate()
    with build_lock(config.out), recorded_run(config.out, "qc", config.to_json()) as run:
        summary = _qc_locked(config, run.run_id, progress)
        run.add_summary(summary, leave_out=("out", "model_info"))
        run.set(model=summary.model_info)
        return summary


def _gather(out: Path, plan: QcPlan, settings: QcSettings, work: Path, chunk_rows: int,
            progress: bool) -> tuple[dict[str, np.memmap], Moments]:
    """Every image's features (``settings.features`` and ``dup_features``) into memory-mapped
    (N, F) float32 files beside ``work``, and the moments of the detectors' features."""
    from tqdm import tqdm

    build = read_build_file(out) or {}
    geometry = build.get("embed", {}).get("geometry", {})
    canvas, grid = geometry.get("clip_canvas"), geometry.get("clip_grid")
    names = sorted({settings.features, settings.dup_features})
    arrays = sorted({STORE_ARRAY[name] for name in names})
    for array in arrays:
        try:
            open_array(out, array)
        except KeyError:
            raise UsageError(f"{out / STORE_NAME} has no {array} array: embed with CLIP (without --no-clip)") from None
    if canvas is None and any(name != "global" for name in names):
        raise UsageError(f"{out / BUILD_FILE} does not record the CLIP geometry; rerun embed with CLIP")
    files: dict[str, np.memmap] = {}
    moments: Moments | None = None
    done = 0
    readers = [iter_rows(out, array, plan.zarr_rows, chunk_rows) for array in arrays]
    with tqdm(total=len(plan.image_ids), desc="qc read", unit="img", disable=not progress) as bar:
        for chunks in zip(*readers):
            stored = dict(zip(arrays, chunks))
            valid = plan.valid_hw[done:done + len(chunks[0])]
            for name in names:
                values = compute_features(name, stored[STORE_ARRAY[name]], valid, canvas or 0, grid or 0)
                if name not in files:
                    files[name] = np.lib.format.open_memmap(work.with_name(f"{work.stem}-{name}.npy"), mode="w+",
                                                            dtype=np.float32, shape=(len(plan.image_ids), values.shape[1]))
                files[name][done:done + len(values)] = values
                if name == settings.features:
                    moments = moments or Moments(values.shape[1])
                    moments.add(values)
            done += len(chunks[0])
            bar.update(len(chunks[0]))
    return files, moments


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


def _near_duplicates(plan: QcPlan, unit: np.ndarray, stored_groups: tuple[list, list], threshold: float, block: int,
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
    for image_id, rep in zip(*stored_groups):
        if rep is not None and image_id in index and rep in index:
            stored_i.append(index[image_id])
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
    near: dict[int, tuple[int, float]] = {}
    scores: dict[str, np.ndarray] = {}
    outlier = np.zeros(0, dtype=bool)
    position: dict[int, int] = {}
    work = folder / f"_work-{run_id}.npy"
    try:
        if plan.new_files:
            settings = model.settings if model is not None else settings
            features, moments = _gather(out, plan, settings, work, config.chunk_rows, progress)
            if model is None:
                rng = np.random.default_rng(settings.seed)
                count = len(plan.image_ids)
                sample = np.sort(rng.choice(count, size=min(settings.fit_sample, count), replace=False))
                model = fit_qc_model(moments, np.asarray(features[settings.features][sample]), settings)
                write_model_files(out, *model.to_parts())
                fitted = True
            scores, outlier = _score(model, features[settings.features], plan.new_images, config.chunk_rows)
            position = {k: p for p, k in enumerate(plan.new_images)}
            stored_groups = ([], []) if fitted else (existing_table.column("image_id").to_pylist(),
                                                     existing_table.column("near_duplicate_of").to_pylist())
            near = _near_duplicates(plan, features[settings.dup_features], stored_groups, settings.dup_threshold,
                                    config.dup_block, progress)
            del features
    finally:
        for leftover in folder.glob(f"{work.stem}-*.npy"):
            leftover.unlink(missing_ok=True)
    table = _new_rows(plan, position, scores, outlier, near, model, run_id)
    if table.num_rows or fitted:
        write_qc_part(out, run_id, table)
    if fitted:
        remove_parts_except(out, run_id)
    model_id = model.model_id if model is not None else "-"
    return QcSummary(
        run_id=run_id,
        out=out,
        model_id=model_id,
        fitted=fitted,
        files=len(plan.files),
        new_files=table.num_rows,
        outliers=int(pc.sum(table.column("outlier")).as_py() or 0),
        near_duplicates=table.num_rows - table.column("near_duplicate_of").null_count,
        exact_duplicates=table.num_rows - table.column("exact_duplicate_of").null_count,
        flagged=int(pc.sum(table.column("flagged")).as_py() or 0),
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


def _new_rows(plan: QcPlan, position: dict[int, int], scores: dict[str, np.ndarray], outlier: np.ndarray,
              near: dict[int, tuple[int, float]], model: QcModel | None, run_id: str) -> pa.Table:
    """The qc rows of this run's new files, built column by column (no dict per row)."""
    files = plan.new_files
    count = len(files)
    index = plan.index
    exact = np.array([f.exact_duplicate_of is not None for f in files], dtype=bool)
    # Where each file's image sits among this run's scored images (-1: an exact copy, not scored).
    at = np.array([-1 if e else position[index[f.image_id]] for f, e in zip(files, exact)], dtype=np.int64)
    scored = at >= 0
    columns: dict[str, object] = {"image_id": [f.image_id for f in files], "path": [f.path for f in files]}
    for name in QC_METHODS:
        values = np.full(count, np.nan)
        if name in scores:
            values[scored] = scores[name][at[scored]]
        columns[f"score_{name}"] = pa.array(values, mask=~scored if name in scores else np.ones(count, dtype=bool))
    is_outlier = np.zeros(count, dtype=bool)
    is_outlier[scored] = outlier[at[scored]]
    near_of: list[str | None] = [None] * count
    similarity: list[float | None] = [None] * count
    for row, f in enumerate(files):
        k = index[f.image_id]
        if scored[row] and k in near:
            rep, value = near[k]
            near_of[row] = plan.image_ids[rep]
            similarity[row] = None if np.isnan(value) else value
    is_near = np.array([n is not None for n in near_of], dtype=bool)
    reason = np.where(exact, REASON_EXACT_DUPLICATE,
                      np.where(is_outlier, REASON_OUTLIER, np.where(is_near, REASON_NEAR_DUPLICATE, "")))
    flagged = exact | is_outlier | is_near
    columns.update(
        outlier=is_outlier, near_duplicate_of=near_of, similarity=similarity,
        exact_duplicate_of=[f.exact_duplicate_of for f in files], flagged=flagged,
        reason=pa.array(reason.tolist(), mask=~flagged, type=pa.string()),
        model_id=[model.model_id if model is not None else ""] * count, run_id=[run_id] * count,
    )
    return qc_table_from_columns(columns)
