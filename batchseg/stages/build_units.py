"""One unit of `batchseg build`: call the stage's own library driver with the shared cluster.

Each function returns a ``UnitResult`` whose ``computed`` says how much work the
stage did (images, files, label parts; 0 when its own incremental logic found
nothing) and whose ``counts`` go to the run record. ``counts["_state"]`` is what the
build stores for the unit beside its fingerprint (``build_state``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from batchseg.config import must_retrain
from batchseg.pipeline.spec import Pipeline
from batchseg.stages.build_plan import StagePlan, student_identity, stored_identity
from batchseg.stages.build_state import stage_state

QC_MIN_IMAGES = 5  # batchseg.stages.qc.MIN_IMAGES (not imported: it loads the qc models)


def run_unit(pipeline: Pipeline, key: str, stage: str, config: Any, plan: StagePlan, shared, log, progress: bool,
             builders: Any):
    """Run one unit whose plan says it is not up to date."""
    from batchseg.stages.build import UnitResult

    runner = {"embed": _embed, "qc": _qc, "pseudolabel": _pseudolabel, "evaluate": _evaluate,
              "train-student": _student, "export": _export, "report": _report}[stage]
    status, computed, line, counts, detail = runner(pipeline, config, plan, shared, progress, builders)
    if status == "ran" and not computed:
        status = "nothing new"  # the stage's own incremental logic found nothing missing
    if detail:
        log.detail(detail)
    return UnitResult(key, stage, status, computed, 0.0, f"{key}: {line}", counts)


def _embed(pipeline, config, plan, shared, progress, builders):
    from batchseg.stages.embed import run_embed

    if plan.new_images:
        config = dataclasses.replace(config, cluster=shared.settings())
    summary = run_embed(config, builders=builders, progress=progress)
    counts = {k: v for k, v in dataclasses.asdict(summary).items() if k not in ("out", "run_id")}
    line = (f"{summary.computed} new images embedded, {summary.ok} ok, {summary.failed} unusable, "
            f"{summary.duplicates} duplicates, {summary.skipped} unchanged")
    return "ran", summary.computed, line, {**counts, "stage_run_id": summary.run_id}, summary.text()


def _qc(pipeline, config, plan, shared, progress, builders):
    from batchseg.io.build_info import manifest_summary
    from batchseg.stages.qc import _load_model, run_qc

    images = len(manifest_summary(pipeline.out).images)
    if images < QC_MIN_IMAGES:
        return ("skipped", 0, f"skipped: qc needs at least {QC_MIN_IMAGES} images, the build has {images}",
                {"images": images}, None)
    stored = _load_model(pipeline.out)
    refit = False
    if stored is not None:
        given = {name: getattr(config.settings, name) for name in config.given}
        requested = dataclasses.replace(stored.settings, **given)
        refit = bool(stored.settings.differences(requested))
    summary = run_qc(dataclasses.replace(config, refit=refit), progress=progress)
    line = (f"{summary.new_files} of {summary.files} files scored{' (settings changed: refitted)' if refit else ''}; "
            f"{summary.flagged} flagged")
    counts = {"files": summary.files, "new_files": summary.new_files, "flagged": summary.flagged, "refit": refit,
              "fitted": summary.fitted, "stage_run_id": summary.run_id}
    return "ran", summary.new_files, line, counts, summary.text()


def _pseudolabel(pipeline, config, plan, shared, progress, builders):
    from batchseg.stages.pseudolabel import run_pseudolabel

    summary = run_pseudolabel(dataclasses.replace(config, cluster=shared.settings()), progress=progress)
    rounds = [{"round": r.round, "images": r.images, "segments": r.segments, "skipped": r.skipped,
               "seconds": r.seconds} for r in summary.rounds]
    parts = ", ".join(f"round {r.round} {'up to date' if r.skipped else f'{r.images} images'}" for r in summary.rounds)
    computed = sum(r.images for r in summary.rounds)
    return ("ran", computed, f"{parts}", {"rounds": rounds, "left_out": summary.left_out,
                                          "stage_run_id": summary.run_id}, summary.text())


def _evaluate(pipeline, config, plan, shared, progress, builders):
    from batchseg.stages.evaluate import run_evaluate

    report = run_evaluate(config)
    last = report.results[-1] if report.results else None
    line = (f"{len(report.results)} rounds and sources scored; last: round {last.round} {last.source} mIoU "
            f"{100 * last.scores.miou:.1f}%" if last else "no labels to score")
    return "ran", len(report.results), line, {"eval_id": report.eval_id, "results": len(report.results)}, report.text()


def _student(pipeline, config, plan, shared, progress, builders):
    from batchseg.io.build_info import label_parts
    from batchseg.io.student_files import CONFIG_FILE, student_folder
    from batchseg.stages.train_student import plan_training, run_train_student

    out = pipeline.out
    key = f"train-student:{config.name}"
    training = plan_training(config)
    ids = [image.image_id for image in training.images]
    identity = student_identity(config, training.round, training.source, ids)
    stored = stored_identity(out, config.name)
    finished = (student_folder(out, config.name) / CONFIG_FILE).exists()
    parts_now = sorted(p.name for p in label_parts(out, training.round))
    state = stage_state(out, key)
    trained_parts = state.get("label_parts")
    overwrite, reason = False, "train"
    if stored is not None and not finished:
        overwrite, reason = stored != identity, "resume" if stored == identity else "settings changed: train again"
    elif stored is not None:
        changed = sorted(k for k in identity if k != "images" and stored.get(k) != identity[k])
        added = len(set(ids) - set(stored.get("images", [])))
        trained = len(stored.get("images", []))
        if changed:
            overwrite, reason = True, f"settings changed ({', '.join(changed)}): retrain"
        elif trained_parts is not None and not set(trained_parts) <= set(parts_now):
            overwrite, reason = True, f"round {training.round}'s labels were recomputed: retrain"
        elif stored.get("images") == identity["images"]:
            return "up to date", 0, "already trained on these labels", {"_state": {"label_parts": parts_now}}, None
        elif must_retrain(pipeline.retrain, pipeline.retrain_fraction, trained, trained + added):
            overwrite, reason = True, f"{added} images added to the {trained} it learnt from: retrain"
        else:
            line = (f"kept: {added} images added to the {trained} it learnt from, within retrain "
                    f"{pipeline.retrain} {pipeline.retrain_fraction}")
            return "kept", 0, line, {"added": added, "trained_on": trained,
                                     "_state": {"label_parts": trained_parts or parts_now}}, None
    summary = run_train_student(dataclasses.replace(config, overwrite=overwrite, cluster=shared.settings()),
                                progress=progress)
    line = (f"{reason}: {'already trained' if summary.skipped else f'{summary.epochs} epochs'} on {summary.images} "
            f"images of round {summary.round} ({summary.source} labels)")
    counts = {"images": summary.images, "round": summary.round, "epochs": summary.epochs,
              "resumed_from": summary.resumed_from, "final_loss": summary.final_loss, "reason": reason,
              "stage_run_id": summary.run_id, "_state": {"label_parts": parts_now}}
    return "ran", 0 if summary.skipped else 1, line, counts, summary.text()


def _export(pipeline, config, plan, shared, progress, builders):
    from batchseg.io.build_info import read_json
    from batchseg.stages.export import SETTINGS_FILE, _resolve, run_export

    overwrite = False
    stored_path = config.dest / SETTINGS_FILE
    if stored_path.exists():
        round_index, source, _ = _resolve(config)
        settings = json.loads(json.dumps({**config.settings(), "round": round_index, "source": source}))
        overwrite = (read_json(stored_path).get("settings") or {}) != settings
    summary = run_export(dataclasses.replace(config, overwrite=overwrite), progress=progress)
    line = (f"{summary.parts_written} label parts written, {summary.parts_skipped} already done"
            f"{' (settings changed: rewritten)' if overwrite else ''}; {summary.images} images, "
            f"{summary.annotations} annotations in {config.dest}")
    counts = {"parts_written": summary.parts_written, "parts_skipped": summary.parts_skipped, "images": summary.images,
              "annotations": summary.annotations, "round": summary.round, "overwrite": overwrite,
              "stage_run_id": summary.run_id}
    return "ran", summary.parts_written, line, counts, summary.text()


def _report(pipeline, config, plan, shared, progress, builders):
    from batchseg.stages.report import run_report

    summary = run_report(config, progress=progress)
    counts = {"images": summary.images, "page_bytes": summary.page_bytes, "stage_run_id": summary.run_id}
    return "ran", 1, f"written: {summary.index}", counts, summary.text()
