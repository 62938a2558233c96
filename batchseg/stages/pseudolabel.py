"""`batchseg pseudolabel`: MaskCLIP labels, SAM masks recognised by CLIP, self-training rounds.

Round 0 labels every stored image from its CLIP dense features (and SAM proposals
decoded from its stored SAM embedding); round k trains a light head on round k-1's
confident labels and predicts every image again. Each round lives in
``OUT/labels/round=K/`` (Parquet parts only, so the folder reads as a hive-partitioned
dataset) and ``OUT/selftrain/round=K/`` (its target grid, head weights and ``_round.json``:
settings key, statistics); a round whose key and inputs are unchanged is skipped.

Round keys hash the text classifier's *inputs* (the CLIP's identity, the classes, the
templates), not the classifier, so deciding that a round is complete needs no model:
a rerun with nothing to do, or a refused setting, never imports torch (issue 8). The
cluster and the worker modules are brought up for the first round that has work; a
worker computes the classifier (``OUT/text/``) when it is missing, and every worker
loads it once, on its own device.
"""
from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchseg.cluster import dask_client, gather_with_progress, gpu_resources
from batchseg.config import BUILD_FILE, PseudolabelConfig, read_build_file
from batchseg.io.files import remove_temporaries, write_json_atomic
from batchseg.io.hashing import sha256_json
from batchseg.errors import UsageError
from batchseg.io.grid_store import ensure_grid_store
from batchseg.io.lock import build_lock
from batchseg.io.statuses import ImageStatus
from batchseg.io.store import ModelGeometry, store_rows
from batchseg.io.build_info import check_label_part
from batchseg.io.tables import (
    numbered_rounds, read_manifest, read_part, round_folder, selftrain_folder, set_aside_round, visible_parts,
)
from batchseg.labels.settings import settings_record
from batchseg.models.specs import ClipSpec, SamSpec, check_head_supported, model_identity
from batchseg.models.vocabulary import classifier_file, classifier_key, with_background
from batchseg.qc.flags import flagged_image_ids
from batchseg.io.runs import recorded_run
from batchseg.stages.pseudolabel_rounds import (
    HEAD_FILE, ROUND_FILE, previous_trained_run, read_round_info, round_decision, round_state,
)
from batchseg.stages.pseudolabel_plan import LabelImage

if TYPE_CHECKING:  # torch-heavy: imported for the first round that has work
    from batchseg.stages.pseudolabel_shard import LabelShard, RoundContext



@dataclass(frozen=True)
class RoundSummary:
    round: int
    images: int  # images labelled this run (0 when the round was already complete)
    segments: int  # label rows written this run
    classes: int  # classes present in the round's targets
    seconds: float
    skipped: bool
    stopped: bool = False  # self-training stops after this round (the stopping rule fired)
    decision: str = ""  # why self-training stopped or went on after this round
    discarded: bool = False  # the round drifted: its labels were set aside, the round before's are the result
    damaged: tuple[tuple[str, str], ...] = ()  # (image id, why): not labelled, stored rows damaged


@dataclass(frozen=True)
class PseudolabelSummary:
    run_id: str
    out: Path
    rounds: tuple[RoundSummary, ...]
    seconds: float
    left_out: int = 0  # images flagged by batchseg qc and not labelled

    @property
    def damaged(self) -> dict[str, str]:
        """Images left unlabelled because their stored embeddings are damaged: id -> why."""
        return {image_id: why for r in self.rounds for image_id, why in r.damaged}

    def text(self) -> str:
        lines = ["pseudolabel finished:"]
        if self.left_out:
            lines.append(f"  left out {self.left_out} images flagged by batchseg qc (--include-flagged to keep them)")
        for r in self.rounds:
            state = "already complete, skipped" if r.skipped else f"{r.images} images, {r.segments} segments"
            lines.append(f"  round {r.round}: {state}; {r.classes} classes present; {r.seconds:.1f} s")
            if r.damaged:
                lines.append(f"  round {r.round}: {len(r.damaged)} images NOT labelled, their stored embeddings "
                             f"are damaged: {r.damaged[0][1]}")
            if r.discarded:
                lines.append(f"  round {r.round} discarded, round {r.round - 1}'s labels are the result: {r.decision}")
            elif r.stopped:
                lines.append(f"  self-training stopped after round {r.round}: {r.decision}")
        lines.append(f"outputs: {self.out / 'labels'}/round=K/part-*.parquet ({self.seconds:.1f} s in all)")
        return "\n".join(lines)


def _stored_build(config: PseudolabelConfig) -> tuple[dict, ModelGeometry]:
    build = read_build_file(config.out)
    if not build or "embed" not in build:
        raise UsageError(f"{config.out} has no embeddings yet; run `batchseg embed SRC {config.out}` first")
    geometry = ModelGeometry.from_json(build["embed"]["geometry"])
    if geometry.clip_canvas is None:
        raise UsageError(f"{config.out} has no CLIP features (embed ran with --no-clip); pseudolabel needs them")
    return build, geometry


def _use_sam(config: PseudolabelConfig, geometry: ModelGeometry) -> bool:
    stored = geometry.sam_embed_shape is not None
    if config.labels.sam == "on" and not stored:
        raise UsageError(
            f"SAM was requested but {config.out} holds no SAM embeddings (embed ran with --no-sam); "
            "rerun embed with SAM into a new folder, or pass --no-sam"
        )
    return stored and config.labels.sam != "off"


def _images(out: Path) -> tuple[LabelImage, ...]:
    seen: dict[str, LabelImage] = {}
    for row in read_manifest(out).to_pylist():
        if row["status"] == ImageStatus.OK and row["image_id"] not in seen:
            seen[row["image_id"]] = LabelImage(
                row["image_id"], row["zarr_row"], row["height"], row["width"], row["clip_valid_h"],
                row["clip_valid_w"], row["sam_valid_h"], row["sam_valid_w"],
            )
    if not seen:
        raise UsageError(f"{out} has no successfully embedded images; nothing to label")
    return tuple(sorted(seen.values(), key=lambda image: image.zarr_row))


def _trusted(images: tuple[LabelImage, ...], config: PseudolabelConfig) -> tuple[tuple[LabelImage, ...], int]:
    """Leave out the images `batchseg qc` flagged (unless --include-flagged); how many were left out."""
    if config.include_flagged:
        return images, 0
    flagged = flagged_image_ids(config.out)
    kept = tuple(image for image in images if image.image_id not in flagged)
    if not kept:
        raise UsageError(f"every embedded image of {config.out} is flagged by batchseg qc; "
                         "pass --include-flagged to label them anyway")
    return kept, len(images) - len(kept)


def _committed_ids(folder: Path) -> set[str]:
    ids: set[str] = set()
    for part in visible_parts(folder):
        check_label_part(part)  # a newer schema's part does not make a round complete
        ids.update(read_part(part, columns=["image_id"]).column("image_id").to_pylist())
    return ids


def _mask_parts(out: Path, images: list[LabelImage]) -> dict[str, str]:
    """Which round-0 part holds each image's SAM masks."""
    wanted = {image.image_id for image in images}
    where: dict[str, str] = {}
    for part in visible_parts(round_folder(out, 0)):
        check_label_part(part)
        for image_id in set(read_part(part, columns=["image_id"]).column("image_id").to_pylist()) & wanted:
            where[image_id] = str(part)
    return where


def run_pseudolabel(config: PseudolabelConfig, progress: bool = True) -> PseudolabelSummary:
    """Make labels for every embedded image of ``config.out``, round 0 then N self-training rounds."""
    config.validate()
    started = time.perf_counter()
    with build_lock(config.out), recorded_run(config.out, "pseudolabel", config.to_json()) as run:
        run_id = run.run_id
        build, geometry = _stored_build(config)
        use_sam = _use_sam(config, geometry)
        check_head_supported(config.labels.dense_head, geometry.clip_kind, use_sam)
        images, left_out = _trusted(_images(config.out), config)
        if config.overwrite:
            shutil.rmtree(config.out / "labels", ignore_errors=True)
            shutil.rmtree(config.out / "selftrain", ignore_errors=True)
        vocab = config.labels.vocabulary
        vocab = with_background(vocab) if config.labels.background else vocab
        clip_spec = ClipSpec(**build["embed"]["models"]["clip"])
        sam_spec = SamSpec(**build["embed"]["models"]["sam"]) if use_sam else None
        # The key text_classifier stores the classifier under: a hash of its inputs, known without torch.
        text_key = classifier_key(model_identity(clip_spec), vocab, config.labels.templates)
        classifier_path = classifier_file(config.out, text_key)
        key = sha256_json({"labels": config.labels.to_json(), "text": text_key, "embed": build["embed"], "sam": use_sam})
        summaries = []
        damaged: set[str] = set()
        client = None
        with ExitStack() as stack:
            for round_index in range(config.rounds + 1):
                if round_index > 0:
                    key = sha256_json({"previous": key, "selftrain": settings_record(config.selftrain), "round": round_index})
                kept = tuple(image for image in images if image.image_id not in damaged)
                plan = _plan_round(config, round_index, kept, key, run_id)
                if plan.skipped is not None:
                    summary = plan.skipped
                else:
                    if client is None:  # the first round with work: the models' modules, the cluster, the classifier
                        from batchseg.stages.pseudolabel_shard import RoundContext, store_text_classifier

                        client = stack.enter_context(dask_client(config.cluster, config.out))
                        if not classifier_path.exists():  # the text tower runs on a worker, on its device
                            client.submit(store_text_classifier, config.out, clip_spec, vocab, config.labels.templates,
                                          resources=gpu_resources(config.cluster), pure=False).result()
                    earlier = range(1, round_index) if config.selftrain.ensemble else ()
                    ctx = RoundContext(config.out, round_index, vocab.names, classifier_path, config.labels, geometry,
                                       use_sam, sam_spec, clip_spec,
                                       selftrain_folder(config.out, round_index) / HEAD_FILE,
                                       tuple(selftrain_folder(config.out, r) / HEAD_FILE for r in earlier))
                    summary = _run_round(client, config, ctx, kept, key, run_id, progress, plan)
                summaries.append(summary)
                run.add_counts(rounds=[asdict(s) for s in summaries], left_out=left_out)
                damaged.update(image_id for image_id, _ in summary.damaged)
                if summary.stopped:
                    _remove_rounds_after(config.out, round_index)
                    break
        if not classifier_path.exists():
            # Later stages read it (train-student): made again when missing, even if every round is complete.
            from batchseg.labels.text_cache import text_classifier

            text_classifier(config.out, clip_spec, vocab, config.labels.templates)
        _record_settings(config, text_key)
    return PseudolabelSummary(run_id, config.out, tuple(summaries), time.perf_counter() - started, left_out)


@dataclass(frozen=True)
class _RoundPlan:
    """What a round needs, decided from its ``_round.json`` and parts alone (no model, no torch)."""

    info: dict | None  # the round's record when it is kept or resumed (see round_state), else None
    pending: list[LabelImage]  # images still to label (all of them when the round is recomputed)
    images_key: str
    skipped: RoundSummary | None = None  # set when the round is already complete: nothing to do
    kept: bool = False  # the head is kept for a changed image set: ``info`` is updated, to be written


def _plan_round(config: PseudolabelConfig, round_index: int, images: tuple[LabelImage, ...], key: str,
                run_id: str) -> _RoundPlan:
    folder = round_folder(config.out, round_index)
    info = read_round_info(selftrain_folder(config.out, round_index))
    images_key = sha256_json([image.image_id for image in images])
    state = round_state(config, round_index, info, key, images_key, len(images))
    if state == "recompute":
        return _RoundPlan(None, list(images), images_key)
    if state == "same" and info.get("discarded") and info.get("complete", True):
        set_aside_round(config.out, round_index)  # again, if a kill came between the record and the move
        return _RoundPlan(info, [], images_key, _already_complete(round_index, info))
    kept = state == "keep"
    if kept:
        # Images were added (or removed) since this round's head was trained and the
        # retrain policy keeps it: the kept head labels the images that have no rows.
        info = {**info, "images_key": images_key, "complete": False, "run_id": run_id}
    # An incomplete round (its run was killed) keeps every shard it committed.
    for part in visible_parts(folder):  # a damaged part (its footer) or a newer schema's is refused
        check_label_part(part)
    # A part moved aside (damaged, quarantined) makes the round incomplete: its images are labelled again.
    complete = info.get("complete", True) and all((folder / name).is_file() for name in info.get("parts", ()))
    done = {image.image_id for image in images} if round_index > 0 and complete else _committed_ids(folder)
    pending = [image for image in images if image.image_id not in done]
    if not pending and complete:
        return _RoundPlan(info, pending, images_key, _already_complete(round_index, info))
    return _RoundPlan(info, pending, images_key, kept=kept)


def _already_complete(round_index: int, info: dict) -> RoundSummary:
    """A complete round's summary, from its record: nothing done, its decision as recorded."""
    decision = info.get("decision") or {}
    present = sum(count > 0 for count in info["stats"]["class_histogram"].values())
    return RoundSummary(round_index, 0, 0, present, 0.0, skipped=True, stopped=bool(decision.get("stop")),
                        decision=decision.get("why", ""), discarded=bool(info.get("discarded")))


def _run_round(client, config: PseudolabelConfig, ctx: RoundContext, images: tuple[LabelImage, ...], key: str,
               run_id: str, progress: bool, plan: _RoundPlan) -> RoundSummary:
    from batchseg.stages.pseudolabel_shard import LabelShard
    from batchseg.stages.pseudolabel_train import round_stats, train_result_json, train_round

    start = time.perf_counter()
    folder = round_folder(config.out, ctx.round_index)
    artefacts = selftrain_folder(config.out, ctx.round_index)
    info, pending, images_key = plan.info, plan.pending, plan.images_key
    resources = gpu_resources(config.cluster)
    same = info is not None
    if plan.kept:
        write_json_atomic(artefacts / ROUND_FILE, info)  # the kept head now also labels the new images
    if not same:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(artefacts, ignore_errors=True)
        info = {"key": key, "images_key": images_key, "round": ctx.round_index, "complete": False,
                "trained": False, "run_id": run_id}
    folder.mkdir(parents=True, exist_ok=True)
    artefacts.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder)
    grid, _ = ctx.head_grid
    ensure_grid_store(config.out, ctx.round_index, store_rows(config.out), grid)
    if not same:
        write_json_atomic(artefacts / ROUND_FILE, info)  # "started": a rerun with this key resumes

    train = info.get("train")
    if ctx.round_index > 0 and not (info.get("trained") and ctx.head_path.exists()):
        future = client.submit(train_round, ctx, images, config.selftrain, resources=resources, pure=False)
        train = train_result_json(future.result())
        info = {**info, "trained": True, "train": train, "trained_images": len(images), "trained_run": run_id,
                "previous_trained_run": previous_trained_run(config.out, ctx.round_index)}
        write_json_atomic(artefacts / ROUND_FILE, info)
    where = _mask_parts(config.out, pending) if ctx.round_index > 0 and ctx.use_sam else {}
    shards = [
        LabelShard(
            f"{run_id}-{index:05d}",
            tuple(pending[i : i + config.shard_size]),
            tuple(sorted({where[im.image_id] for im in pending[i : i + config.shard_size] if im.image_id in where})),
        )
        for index, i in enumerate(range(0, len(pending), config.shard_size))
    ]
    rows, damaged = _run_label_shards(client, ctx, shards, resources, progress)
    stats = round_stats(config.out, ctx.round_index, images, ctx.names)
    decision = round_decision(config, ctx.round_index, stats)
    discarded = bool(decision.get("discard"))
    write_json_atomic(artefacts / ROUND_FILE, {
        "decision": decision,
        "discarded": discarded,
        "key": key,
        "images_key": images_key,
        "round": ctx.round_index,
        "images": len(images),
        "settings": config.labels.to_json() if ctx.round_index == 0 else settings_record(config.selftrain),
        "sam": ctx.use_sam,
        "stats": stats,
        "complete": not damaged,  # a rerun labels the images left out once `embed --verify` repaired them
        "parts": [part.name for part in visible_parts(folder)],
        "damaged": [image_id for image_id, _ in damaged],
        "trained": ctx.round_index > 0,
        "train": train,
        "trained_images": info.get("trained_images", len(images)) if ctx.round_index > 0 else None,
        "trained_run": info.get("trained_run"),
        "previous_trained_run": info.get("previous_trained_run"),
        "run_id": run_id,
    })
    if discarded:  # after the record: a rerun that finds the record moves them if a kill came first
        set_aside_round(config.out, ctx.round_index)
    classes = sum(count > 0 for count in stats["class_histogram"].values())
    return RoundSummary(ctx.round_index, len(pending) - len(damaged), rows, classes, time.perf_counter() - start,
                        skipped=False, stopped=decision["stop"], decision=decision["why"], discarded=discarded,
                        damaged=damaged)


def _remove_rounds_after(out: Path, round_index: int) -> None:
    """Drop rounds a previous run made beyond where self-training now stops (stale)."""
    for parent in (out / "labels", out / "selftrain"):
        for index, folder in numbered_rounds(parent):
            if index > round_index:
                shutil.rmtree(folder, ignore_errors=True)


def _run_label_shards(client, ctx: RoundContext, shards: list[LabelShard], resources, progress: bool
                      ) -> tuple[int, tuple[tuple[str, str], ...]]:
    """Label rows written, and the (image id, why) of images left out for damaged stored rows."""
    from batchseg.stages.pseudolabel_shard import run_label_shard

    futures = [client.submit(run_label_shard, ctx, shard, resources=resources, pure=False) for shard in shards]
    total = sum(len(shard.images) for shard in shards)
    results = gather_with_progress(futures, total, f"round {ctx.round_index}", progress, lambda r: r.images)
    return sum(result.rows for result in results), tuple(d for result in results for d in result.damaged)


def _record_settings(config: PseudolabelConfig, text_key: str) -> None:
    """What later stages read of this run: the vocabulary and settings, in ``batchseg.json``."""
    data = read_build_file(config.out) or {}
    data["pseudolabel"] = {
        "labels": config.labels.to_json(),
        "selftrain": settings_record(config.selftrain),
        "rounds": config.rounds,
        "text_classifier": classifier_file(config.out, text_key).relative_to(config.out).as_posix(),
    }
    write_json_atomic(config.out / BUILD_FILE, data)
