"""The plan of `batchseg build`: per stage, its fingerprint and what a run would compute.

Planning only reads files (no model, no cluster): a run with nothing new decides
"up to date" for every stage from file listings, and ``--dry-run`` prints these plans.
What new images do to the later stages (README, `batchseg build`):

- embed computes only new content; qc scores only new files with its stored model;
- pseudolabel round 0 labels only the new images;
- rounds >= 1 and students keep their weights while the images added since they were
  trained stay within the retrain policy (``retrain: never``, or ``fraction`` up to
  ``retrain-fraction`` of the images they were trained on): the kept head labels the
  new images; past it (or ``retrain: always``) they retrain on every image;
- a settings change recomputes what it affects (pseudolabel's round keys; a student
  whose settings or labels changed retrains); export writes only new label parts;
  evaluate and report run again when their inputs changed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchseg.config import must_retrain, read_build_file
from batchseg.io.statuses import ImageStatus
from batchseg.pipeline.spec import Pipeline
from batchseg.stages.build_state import fingerprint, listing, stage_state


@dataclass(frozen=True)
class StagePlan:
    """One stage (or one student / export) of one run."""

    key: str  # "embed", "qc", "pseudolabel", "evaluate", "train-student:NAME", "export:DEST", "report"
    stage: str  # the stage name (--from / --only)
    fingerprint: str | None  # None: always planned from the files (embed)
    up_to_date: bool
    what: str  # what a run would compute, one line
    new_images: int = 0  # embed: unique new images (what the later stages will see added)

    def line(self) -> str:
        return f"{self.key}: {'up to date' if self.up_to_date else self.what}"


def stage_keys(pipeline: Pipeline) -> list[tuple[str, str, Any]]:
    """(key, stage, config) for every unit of work, in order."""
    units: list[tuple[str, str, Any]] = [("embed", "embed", pipeline.embed)]
    if pipeline.qc is not None:
        units.append(("qc", "qc", pipeline.qc))
    if pipeline.pseudolabel is not None:
        units.append(("pseudolabel", "pseudolabel", pipeline.pseudolabel))
    if pipeline.evaluate is not None:
        units.append(("evaluate", "evaluate", pipeline.evaluate))
    units += [(f"train-student:{s.name}", "train-student", s) for s in pipeline.students]
    units += [(f"export:{e.dest}", "export", e) for e in pipeline.exports]
    if pipeline.report is not None:
        units.append(("report", "report", pipeline.report))
    return units


def stage_fingerprint(pipeline: Pipeline, key: str, config: Any) -> str | None:
    """Settings and file listings of one unit, hashed (``batchseg.stages.build_state``)."""
    out = pipeline.out
    labels = listing(out / "labels")
    if key == "embed":
        return None
    if key == "qc":
        settings = {k: v for k, v in config.to_json().items() if k != "out"}
        files = {"manifest": listing(out / "manifest"), "qc": listing(out / "qc")}
    elif key == "pseudolabel":
        from batchseg.labels.settings import settings_record

        settings = {"labels": config.labels.to_json(), "selftrain": settings_record(config.selftrain),
                    "rounds": config.rounds, "include_flagged": config.include_flagged,
                    "retrain": config.retrain, "retrain_fraction": config.retrain_fraction,
                    "embed": (read_build_file(out) or {}).get("embed")}
        files = {"manifest": listing(out / "manifest"), "qc": listing(out / "qc"), "labels": labels,
                 "selftrain": listing(out / "selftrain", ("*/_round.json", "*/head.safetensors"))}
    elif key == "evaluate":
        settings = {"gt": str(config.gt.resolve()), "ignore_index": config.ignore_index, "gt_offset": config.gt_offset}
        files = {"labels": labels, "gt": listing(config.gt), "eval": listing(out / "eval")}
    elif key.startswith("train-student:"):
        settings = {**config.identity(), "name": config.name, "include_flagged": config.include_flagged,
                    "images": str(config.images), "retrain": pipeline.retrain, "fraction": pipeline.retrain_fraction}
        files = {"labels": labels, "qc": listing(out / "qc"),
                 "student": listing(out / "students" / config.name, ("config.json",))}
    elif key.startswith("export:"):
        settings = {**config.settings(), "dest": str(config.dest.resolve()), "src": str(config.src)}
        files = {"labels": labels, "manifest": listing(out / "manifest"),
                 "dest": listing(config.dest, ("_export.json",))}
    elif key == "report":
        settings = dataclasses.asdict(config) | {"out": None, "src": str(config.src)}
        files = {"manifest": listing(out / "manifest"), "labels": labels, "qc": listing(out / "qc"),
                 "eval": listing(out / "eval"), "students": listing(out / "students", ("*/config.json",)),
                 "selftrain": listing(out / "selftrain", ("*/_round.json",)),
                 "report": listing(out / "report", ("index.html",))}
    else:
        raise ValueError(f"unknown build unit {key}")
    return fingerprint(settings, files)


def plan_unit(pipeline: Pipeline, key: str, stage: str, config: Any, new_images: int) -> StagePlan:
    """The plan of one unit; ``new_images``: images the stages before it will add (dry-run)."""
    if key == "embed":
        return plan_embed_stage(pipeline)
    stamp = stage_fingerprint(pipeline, key, config)
    if stamp == stage_state(pipeline.out, key).get("fingerprint") and not new_images:
        return StagePlan(key, stage, stamp, True, "up to date")
    if key == "pseudolabel":
        what = describe_pseudolabel(pipeline, new_images)
    elif key.startswith("train-student:"):
        what = describe_student(pipeline, config, new_images)
    elif key == "qc":
        what = describe_qc(pipeline, new_images)
    else:
        what = {"evaluate": "evaluate every round against the ground truth", "report": "write the report again"}.get(
            key, "export the label parts not exported yet")
    return StagePlan(key, stage, stamp, False, what)


def plan_embed_stage(pipeline: Pipeline) -> StagePlan:
    from batchseg.io.images import discover_images
    from batchseg.io.tables import read_manifest
    from batchseg.stages.embed import included
    from batchseg.stages.embed_plan import plan_embed

    config = pipeline.embed
    try:
        files = included(discover_images(config.source, exclude=(config.out,)), config)
    except OSError as exc:
        from batchseg.errors import UsageError

        raise UsageError(f"cannot read source folder {config.source}: {exc}") from None
    plan = plan_embed(files, read_manifest(config.out), "dry-run")
    unique = len({p.image_id for p in plan.pending})
    failures = sum(r["status"] != ImageStatus.DUPLICATE for r in plan.recorded_rows)
    if not plan.pending and not plan.recorded_rows:
        return StagePlan("embed", "embed", None, True, "up to date")
    what = (f"{len(plan.pending)} new images to embed ({unique} unique), {plan.duplicates} duplicates, "
            f"{failures} unusable files; {plan.known} files unchanged")
    return StagePlan("embed", "embed", None, False, what, new_images=unique)


def _current_images(out: Path, include_flagged: bool) -> tuple[set[str], set[str]]:
    """(usable image ids, of which flagged by qc) from the manifest and qc table."""
    from batchseg.io.tables import read_manifest
    from batchseg.qc.flags import flagged_image_ids

    rows = read_manifest(out).select(["image_id", "status"]).to_pylist()
    ids = {r["image_id"] for r in rows if r["status"] == ImageStatus.OK}
    flagged = set() if include_flagged or not (out / "qc").exists() else set(flagged_image_ids(out)) & ids
    return ids, flagged


def describe_qc(pipeline: Pipeline, new_images: int) -> str:
    from batchseg.io.qc_table import read_model_files

    if read_model_files(pipeline.out) is None:
        return "fit the qc model and score every file"
    coming = f" (embed adds {new_images} new images)" if new_images else ""
    return f"score the files it has not scored yet with the stored model{coming}"


def describe_pseudolabel(pipeline: Pipeline, new_images: int) -> str:
    import pyarrow.parquet as pq

    from batchseg.io.tables import round_folder, selftrain_folder, visible_parts
    from batchseg.labels.settings import settings_record
    from batchseg.stages.pseudolabel_rounds import read_round_info

    config = pipeline.pseudolabel
    out = pipeline.out
    stored = (read_build_file(out) or {}).get("pseudolabel") if (out / "batchseg.json").exists() else None
    if not stored:
        return f"label every image: round 0 and up to {config.rounds} self-training rounds"
    current = {"labels": config.labels.to_json(), "selftrain": settings_record(config.selftrain)}
    if json.loads(json.dumps(current)) != {"labels": stored.get("labels"), "selftrain": stored.get("selftrain")}:
        which = "every round" if stored.get("labels") != json.loads(json.dumps(current["labels"])) else "rounds >= 1"
        return f"settings changed: recompute {which}"
    ids, flagged = _current_images(out, config.include_flagged)
    done: set[str] = set()
    for part in visible_parts(round_folder(out, 0)):
        done.update(pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist())
    new = len(ids - flagged - done) + new_images
    lines = [f"round 0: label {new} new images"]
    now = len(ids - flagged) + new_images
    retrained = False  # a round after a retrained one retrains too
    for k in range(1, config.rounds + 1):
        info = read_round_info(selftrain_folder(out, k))
        if info is None:
            lines.append(f"round {k}: train and label every image")
            retrained = True
            continue
        trained = info.get("trained_images") or info.get("images") or 0
        retrain = retrained or (trained != now and must_retrain(config.retrain, config.retrain_fraction, trained, now))
        if retrain:
            why = "the round before retrains" if retrained else (
                f"{max(0, now - trained)} images added to the {trained} it was trained on; retrain {config.retrain}")
            lines.append(f"round {k}: retrain the head ({why}) and label every image")
            retrained = True
        elif now != info.get("images") or not info.get("complete"):
            lines.append(f"round {k}: the kept head labels the {max(0, now - info.get('images', now))} new images")
    return "; ".join(lines)


def student_identity(config: Any, round_index: int, source: str, images: list[str]) -> dict:
    """The identity ``train_student`` stores in ``_checkpoints/_settings.json``."""
    return json.loads(json.dumps({**config.identity(), "round": round_index, "source": source,
                                  "images": sorted(images)}))


def stored_identity(out: Path, name: str) -> dict | None:
    from batchseg.io.student_files import CHECKPOINTS, student_folder
    from batchseg.stages.train_student import SETTINGS_FILE

    path = student_folder(out, name) / CHECKPOINTS / SETTINGS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe_student(pipeline: Pipeline, config: Any, new_images: int) -> str:
    from batchseg.io.student_files import CONFIG_FILE, student_folder

    stored = stored_identity(pipeline.out, config.name)
    if stored is None or not (student_folder(pipeline.out, config.name) / CONFIG_FILE).exists():
        return "train (or resume) the student"
    mine = json.loads(json.dumps(config.identity()))
    changed = sorted(k for k in mine if k not in ("round", "source") and stored.get(k) != mine[k])
    if changed:
        return f"settings changed ({', '.join(changed)}): retrain"
    trained = len(stored.get("images", []))
    if new_images and must_retrain(pipeline.retrain, pipeline.retrain_fraction, trained, trained + new_images):
        return f"retrain: {new_images} images added to the {trained} it learnt from (retrain {pipeline.retrain})"
    return "retrain if its labels were recomputed, else keep it (new images within the retrain policy)"
