"""The `batchseg` command line: parse options, call a stage, map errors to exit codes."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from batchseg.errors import BatchsegError

# Choices and defaults are the library's own; these modules import neither torch nor Dask.
from batchseg.choices import (
    DENSE_HEADS, EXPORT_FORMATS, KEY_SMOOTHING, PRECISIONS, QC_FEATURES, QC_METHODS, REGION_VOTES, SAM_MODELS,
    STUDENT_EXPORT_FORMATS,
)
from batchseg.stages.embed_options import DEFAULTS as EMBED_DEFAULTS
from batchseg.stages.pseudolabel_options import DEFAULTS as PSEUDOLABEL_DEFAULTS
from batchseg.stages.evaluate_options import DEFAULTS as EVALUATE_DEFAULTS
from batchseg.stages.export_plan import DEFAULTS as EXPORT_DEFAULTS
from batchseg.stages.report_options import DEFAULTS as REPORT_DEFAULTS
from batchseg.stages.train_student_options import DEFAULTS as TRAIN_STUDENT_DEFAULTS
from batchseg.cluster import OPTION_FIELDS, SCHEDULER_ENV, ClusterSettings
from batchseg.io.files import IMAGE_MODES
from batchseg.io.statuses import TRAIN_SOURCES, LabelKind, StudentKind, values
from batchseg.students.settings import BLOCK_KINDS, NMS_KINDS

EXIT_CODES_HELP = """\b
Exit codes:
  0   finished (unusable images are manifest rows, not failures)
  1   the run failed
  2   usage error (bad options or input, settings that contradict OUT)
  75  another run holds the lock on OUT
"""


CLUSTER_HELP = {
    "workers": "CPU worker processes of the local cluster.",
    "gpus": "One local worker per GPU (pinned).",
    "threads": "Torch threads per worker; default: cores / workers.",
    "scheduler": f"Address of an existing Dask scheduler [env: {SCHEDULER_ENV}].",
}


def cluster_options(local: bool = True, **reworded: str):
    """The cluster options of every command that runs on Dask, defined once.

    ``--workers``, ``--gpus``, ``--threads`` (when ``local``) and ``--scheduler`` (or
    DASK_SCHEDULER_ADDRESS), with ClusterSettings' defaults; the command receives them as
    one ``cluster: ClusterSettings``. Without ``local`` (``build``, whose pipeline file
    describes the cluster) only ``--scheduler``, received as ``scheduler``. ``reworded``
    gives an option's help in a command's own words, e.g. ``gpus="..."``.
    """
    texts = {**CLUSTER_HELP, **reworded}
    defaults = ClusterSettings()
    options = [click.option("--scheduler", envvar=SCHEDULER_ENV, default=defaults.scheduler, help=texts["scheduler"])]
    if local:
        options[:0] = [
            click.option("--workers", type=int, default=defaults.workers, show_default=True, help=texts["workers"]),
            click.option("--gpus", type=int, default=defaults.gpus, show_default=True, help=texts["gpus"]),
            click.option("--threads", type=int, default=defaults.torch_threads, help=texts["threads"]),
        ]

    def decorate(command):
        if local:
            callback = command

            @functools.wraps(callback)
            def command(**params):
                cluster = ClusterSettings.from_options({name: params.pop(name) for name in OPTION_FIELDS})
                return callback(**params, cluster=cluster)

        for option in reversed(options):  # applied bottom-up: listed in this order in --help
            command = option(command)
        return command

    return decorate


def _fail(exc: BatchsegError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="batchseg")
def cli() -> None:
    """batchseg: folders of unlabelled images to segmentation datasets.

    \b
    Stages (each reads the previous stage's files in OUT):
      embed        images -> CLIP dense features + SAM embeddings (Zarr) + manifest (Parquet)
      pseudolabel  stored embeddings -> MaskCLIP labels, SAM masks recognised, self-training rounds
      evaluate     labels of every round and source -> IoU against a few hand-labelled images
      train-student  labels + images -> a small deployable model (predict, export-student apply it)
      qc           stored embeddings -> outlier scores, near-duplicates, flags (OUT/qc)
      export       labels of a round -> COCO JSON, PNG label maps or YOLO polygons; report: an HTML page
      build        a pipeline file (pipelines/NAME.yaml): all of the above, one cluster, incremental, for cron
    """


EMBED_HELP = f"""Compute CLIP dense features and SAM image embeddings for every image under SRC.

Writes OUT/embeddings.zarr (one row per unique image), OUT/manifest/part-*.parquet
(one row per file, failures included) and OUT/batchseg.json. Reruns are incremental:
only new or changed images are computed; renamed files and duplicates are recorded,
not recomputed.

\b
Examples:
  # real models, local cluster of 2 CPU worker processes
  batchseg embed photos/ out/ --clip-model ViT-B-16 --clip-pretrained openai \\
      --sam-model vit_b --sam-checkpoint sam_vit_b_01ec64.pth --workers 2
  # a SAM model folder: a distilled encoder (train-student --kind sam-encoder), into a new OUT
  batchseg embed photos/ out2/ --clip-model ViT-B-16 --sam-model out/students/fast-sam
  # a model folder in open_clip's local-dir format, CLIP only, 4 GPUs
  batchseg embed photos/ out/ --clip-model local-dir:models/clip --no-sam --gpus 4
  # join an existing Dask cluster (or set DASK_SCHEDULER_ADDRESS)
  batchseg embed /data/photos /data/out --scheduler tcp://10.0.0.5:8786 ...

{EXIT_CODES_HELP}"""


@cli.command(help=EMBED_HELP)
@click.argument("src", type=click.Path(path_type=Path, file_okay=False))
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--clip-model", default=EMBED_DEFAULTS.clip_model, show_default=True,
              help="open_clip model name, or local-dir:PATH (open_clip_config.json + weights).")
@click.option("--clip-pretrained", default=EMBED_DEFAULTS.clip_pretrained,
              help="open_clip pretrained tag or a checkpoint file (default: openai for named models; "
                   "none for local-dir), or 'random' (speed tests only).")
@click.option("--dense-form", hidden=True, default=None)
@click.option("--no-clip", is_flag=True, help="Do not compute CLIP features.")
@click.option("--canvas", type=int, default=EMBED_DEFAULTS.canvas,
              help="CLIP input size in pixels (square, letterboxed); default: the model's own size. "
                   "Larger when objects are small in the image, so they reach the size CLIP was trained on.")
@click.option("--fine-canvas", type=int, default=EMBED_DEFAULTS.fine_canvas,
              help="Also store CLIP's tokens at this larger canvas, e.g. twice --canvas; pseudolabel then averages "
                   "MaskCLIP's logits over both canvases, so objects of more sizes meet the scale CLIP knows. "
                   "Costs a second CLIP pass and stored tokens 4x the first canvas's at twice the size. "
                   "Measured: better round-0 labels, but self-training did not always keep the gain (README): "
                   "check it with evaluate. 0 (default): none.")
@click.option("--sam-model", default=EMBED_DEFAULTS.sam_model, show_default=True,
              help="SAM architecture (vit_b, vit_l, vit_h, tiny), or a SAM model folder (config.json + "
                   "model.safetensors), e.g. a distilled OUT/students/NAME of train-student --kind sam-encoder.")
@click.option("--sam-checkpoint", default=EMBED_DEFAULTS.sam_checkpoint,
              help="SAM weights (.pth as released, or .safetensors), or 'random' (speed tests only).")
@click.option("--no-sam", is_flag=True, help="Do not compute SAM embeddings.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=EMBED_DEFAULTS.precision, show_default=True,
              help="Forward-pass precision (stored values are fp16 either way).")
@click.option("--batch-size", type=int, default=EMBED_DEFAULTS.batch_size, show_default=True, help="Images per forward pass.")
@click.option("--shard-size", type=int, default=EMBED_DEFAULTS.shard_size, show_default=True,
              help="Images per Dask task (and per manifest part).")
@cluster_options(scheduler="Address of an existing Dask scheduler to use instead of a local cluster "
                           f"[env: {SCHEDULER_ENV}].")
@click.option("--max-pixels", type=int, default=EMBED_DEFAULTS.max_pixels,
              help="Refuse images with more pixels than this (decompression bombs). Default: about 179 million.")
@click.option("--overwrite", is_flag=True, help="Start over: delete this build's outputs in OUT first.")
@click.option("--verify", is_flag=True,
              help="Read every stored row back (checksums, missing chunks) and recompute the damaged ones.")
@click.option("--repair", is_flag=True,
              help="Move damaged or stray manifest parts to OUT/quarantine/ and re-plan the files they covered, "
                   "keeping intact embeddings whose content still matches.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def embed(src, out, dense_form, cluster, overwrite, verify, repair, quiet, **options) -> None:
    from batchseg.errors import UsageError
    from batchseg.stages.embed import run_embed
    from batchseg.stages.embed_options import EmbedOptions

    try:
        if dense_form is not None:
            raise UsageError(
                "--dense-form is gone: embed now stores tokens every dense head can use; choose the head at "
                "label time, e.g. `batchseg pseudolabel OUT --dense-head value` (was --dense-form clear)"
            )
        chosen = EmbedOptions(**options)
        sam_model = chosen.sam_model
        sam_folder = not chosen.no_sam and sam_model not in SAM_MODELS
        if sam_folder and not Path(sam_model).expanduser().is_dir():
            from batchseg.models.specs import unknown_sam_message

            raise UsageError(unknown_sam_message(sam_model))
        if sam_folder and chosen.sam_checkpoint is not None:
            raise UsageError(f"--sam-model {sam_model} is a SAM model folder, which carries its own weights: "
                             "drop --sam-checkpoint")
        if not chosen.no_sam and not sam_folder and chosen.sam_checkpoint is None:
            raise UsageError(
                "SAM needs weights: pass --sam-checkpoint PATH (e.g. sam_vit_b_01ec64.pth), "
                "or --no-sam to compute CLIP features only"
            )
        config = chosen.config(src, out, cluster, overwrite=overwrite, verify=verify, repair=repair)
        summary = run_embed(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())
    if summary.unrepaired:
        click.echo(f"error: {len(summary.unrepaired)} damaged rows could not be recomputed (their files are gone or "
                   f"changed); later stages skip those images. First: {summary.unrepaired[0]}", err=True)
        sys.exit(1)


PSEUDOLABEL_HELP = f"""Label every embedded image in OUT without annotation.

Round 0: labels from a training-free dense CLIP head computed from the stored tokens
(--dense-head: MaskCLIP by default, or ClearCLIP, SCLIP, NACLIP, ProxyCLIP with SAM as
the proxy; prompt denoising, key smoothing), SAM everything-mode masks decoded from
the stored SAM embeddings, each taking a class from the labels inside it (instance rows)
and voting it into the semantic map. Rounds 1..N: a light head trained on confident
labels predicts every image again (MaskCLIP+ self-training), until the rounds stop
changing the labels (--stop-agreement); a round that overturns more of round 0's surest
labels than the round before is set aside (--drift-tolerance). No image is re-encoded.

Writes OUT/labels/round=K/part-*.parquet (COCO RLE masks in original pixels; the
folder reads as a hive-partitioned Parquet dataset) and OUT/selftrain/round=K/
(_round.json statistics and stop decision, training targets, head weights). Reruns
skip complete rounds; changing the classes or settings recomputes what they affect.

\b
Examples:
  batchseg pseudolabel out/ --classes "cat,dog|puppy,sofa" --rounds 3
  batchseg pseudolabel out/ --vocab classes.txt --background --no-sam --rounds 0
  batchseg pseudolabel out/ --classes "car,road,tree" --key-smoothing on   # MaskCLIP as published
  batchseg pseudolabel out/ --classes "car,road,tree" --dense-head naclip   # another head, same embeddings

{EXIT_CODES_HELP}"""


@cli.command(help=PSEUDOLABEL_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--classes", default=None, help='Comma-separated classes; synonyms with "|": "cat|kitten,dog".')
@click.option("--vocab", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File with one class per line (synonyms with |, # comments).")
@click.option("--templates", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Prompt templates, one per line with {} (default: MaskCLIP's 85).")
@click.option("--background", is_flag=True, help='Add "background" as a text class.')
@click.option("--bg-floor", type=float, default=PSEUDOLABEL_DEFAULTS.bg_floor, help="Leave pixels unlabelled whose best probability is below this.")
@click.option("--dense-head", type=click.Choice(DENSE_HEADS), default=PSEUDOLABEL_DEFAULTS.dense_head, show_default=True,
              help="Training-free dense CLIP head computed from the stored tokens: maskclip (the paper, value path "
                   "with residual + MLP), value (no residual/MLP), clearclip, sclip, naclip, or proxy-sam "
                   "(ProxyCLIP with the stored SAM embedding as the proxy). Changing it never needs re-embedding.")
@click.option("--proxy-grid", type=int, default=PSEUDOLABEL_DEFAULTS.proxy_grid, show_default=True,
              help="proxy-sam: SAM's grid is average-pooled to at most this many cells per side (the attention "
                   "costs the grid's 4th power; 64 x 64, SAM ViT's own, costs about one CLIP ViT-B forward pass).")
@click.option("--region-vote", type=click.Choice(REGION_VOTES), default=PSEUDOLABEL_DEFAULTS.region_vote, show_default=True,
              help="How each SAM mask picks its class: pool (argmax of the probabilities pooled inside it), or "
                   "majority of the pixel labels inside it (CorrCLIP's region correction).")
@click.option("--bg-mask-vote", is_flag=True,
              help="With --background: a SAM mask recognised as background repaints its pixels background. "
                   "Off by default: such masks mostly hold objects the coarse CLIP grid half-missed, and "
                   "repainting them erased the object pixels it got right.")
@click.option("--fine-weight", type=float, default=PSEUDOLABEL_DEFAULTS.fine_weight, show_default=True,
              help="Builds embedded with --fine-canvas: the fine canvas's weight in round 0's averaged logits "
                   "(0 ignores it, 1 uses it alone).")
@click.option("--pd-thresh", type=float, default=PSEUDOLABEL_DEFAULTS.pd_thresh, show_default=True,
              help="Prompt denoising: drop a class whose max probability in the image is below this.")
@click.option("--no-prompt-denoising", is_flag=True, help="Switch prompt denoising off.")
@click.option("--key-smoothing", type=click.Choice(KEY_SMOOTHING), default=PSEUDOLABEL_DEFAULTS.key_smoothing, show_default=True,
              help="MaskCLIP's key smoothing of round 0's scores: on, off, or auto: only when no "
                   "SAM masks vote the map, whose region vote is the finer smoothing.")
@click.option("--no-key-smoothing", is_flag=True, hidden=True, help="Same as --key-smoothing off.")
@click.option("--sam/--no-sam", "sam", default=PSEUDOLABEL_DEFAULTS.sam, help="Use the stored SAM embeddings (default: when stored).")
@click.option("--points-per-side", type=int, default=PSEUDOLABEL_DEFAULTS.points_per_side, show_default=True, help="SAM everything-mode point grid.")
@click.option("--pred-iou-thresh", type=float, default=PSEUDOLABEL_DEFAULTS.pred_iou_thresh, show_default=True, help="Keep SAM masks above this predicted IoU.")
@click.option("--stability-thresh", type=float, default=PSEUDOLABEL_DEFAULTS.stability_thresh, show_default=True, help="Keep SAM masks this stable.")
@click.option("--nms-thresh", type=float, default=PSEUDOLABEL_DEFAULTS.nms_thresh, show_default=True, help="Fast NMS IoU threshold for SAM masks (on their boxes, then on the masks).")
@click.option("--work-max-side", type=int, default=PSEUDOLABEL_DEFAULTS.work_max_side, show_default=True,
              help="Label maps are made at most this many pixels a side, then mapped up to the original "
                   "size (bounds memory and time on very large images).")
@click.option("--rounds", type=int, default=PSEUDOLABEL_DEFAULTS.rounds, show_default=True, help="Self-training rounds after round 0.")
@click.option("--conf-thresh", type=float, default=PSEUDOLABEL_DEFAULTS.conf_thresh, show_default=True,
              help="Self-training learns only from pixels whose label confidence reaches this.")
@click.option("--class-balance", type=float, default=PSEUDOLABEL_DEFAULTS.class_balance, show_default=True,
              help="Self-training loss weight per class: (pixel frequency)^-this; 0 = unweighted, 1 = inverse frequency.")
@click.option("--class-quantile", type=float, default=PSEUDOLABEL_DEFAULTS.class_quantile, show_default=True,
              help="Per-class thresholds: a class the labeller is never sure of keeps its most confident "
                   "(1 - this) share of pixels even below --conf-thresh. 0 switches it off.")
@click.option("--teacher-rounds", type=int, default=PSEUDOLABEL_DEFAULTS.teacher_rounds, show_default=True,
              help="MaskCLIP+'s schedule: rounds 1..N learn from round 0's labels, later rounds from the round before.")
@click.option("--stop-agreement", type=float, default=PSEUDOLABEL_DEFAULTS.stop_agreement, show_default=True,
              help="Stop self-training once a round agrees with the one before on this share of cells "
                   "(recorded in _round.json); 1 runs every round.")
@click.option("--ema-decay", type=float, default=PSEUDOLABEL_DEFAULTS.ema_decay, show_default=True,
              help="The saved head is the exponential moving average of its weights (0: the last step's).")
@click.option("--anchor/--no-anchor", default=PSEUDOLABEL_DEFAULTS.anchor, show_default=True,
              help="A round that learns from the round before skips the cells where that round left round 0's "
                   "label, so a round's own mistakes are not taught to the next (the rounds drifted without it).")
@click.option("--drift-tolerance", type=float, default=PSEUDOLABEL_DEFAULTS.drift_tolerance, show_default=True,
              help="Keep the better round: a round (from 2 on) that overturns more of round 0's most confident "
                   "cells than the round before did, by more than this share, has drifted; its labels are set "
                   "aside (OUT/selftrain/round=K/set-aside-labels) and the round before's are the result. "
                   "1 keeps every round.")
@click.option("--ensemble/--no-ensemble", default=PSEUDOLABEL_DEFAULTS.ensemble, show_default=True,
              help="A round's labels come from the mean of its head's probabilities and every earlier round's "
                   "(each head re-fits its targets with noise of its own; the mean keeps what they agree on).")
@click.option("--warm-start/--no-warm-start", default=PSEUDOLABEL_DEFAULTS.warm_start, show_default=True,
              help="Each round starts from the previous round's head (else from MaskCLIP).")
@click.option("--epochs", type=int, default=PSEUDOLABEL_DEFAULTS.epochs, show_default=True, help="Training epochs per round.")
@click.option("--seed", type=int, default=PSEUDOLABEL_DEFAULTS.seed, show_default=True, help="Seed of the self-training head.")
@click.option("--shard-size", type=int, default=PSEUDOLABEL_DEFAULTS.shard_size, show_default=True, help="Images per Dask task.")
@cluster_options()
@click.option("--include-flagged", is_flag=True, help="Also label the images `batchseg qc` flagged (left out by default).")
@click.option("--overwrite", is_flag=True, help="Delete all labels in OUT first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def pseudolabel(out, classes, vocab, templates, cluster, overwrite, quiet, **options) -> None:
    from batchseg.errors import UsageError
    from batchseg.stages.pseudolabel_options import PseudolabelOptions
    from batchseg.models.vocabulary import MASKCLIP_TEMPLATES, load_templates, load_vocab_file, parse_classes
    from batchseg.stages.pseudolabel import run_pseudolabel

    try:
        if (classes is None) == (vocab is None):
            raise UsageError("give the classes with exactly one of --classes or --vocab")
        if not out.exists():
            raise UsageError(f"output folder {out} does not exist; run `batchseg embed SRC {out}` first")
        config = PseudolabelOptions(**options).config(
            out,
            vocabulary=parse_classes(classes) if classes is not None else load_vocab_file(vocab),
            templates=load_templates(templates) if templates else MASKCLIP_TEMPLATES,
            cluster=cluster,
            overwrite=overwrite,
        )
        summary = run_pseudolabel(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())
    if summary.damaged:
        click.echo(f"error: {len(summary.damaged)} images were not labelled because their stored embeddings are "
                   f"damaged; run `batchseg embed SRC {out} --verify` to recompute them, then pseudolabel again",
                   err=True)
        sys.exit(1)


EVALUATE_HELP = f"""Measure the pseudo labels in OUT against a few hand-labelled images.

GT is a folder of PNG label maps (single-channel L or palette P, read as raw indices;
a/img1.png is matched to image a/img1.jpg, a flat folder by file name) or a COCO
instance JSON (images matched by file_name, categories to the build's classes by name).
PNG values: --ignore-index is not scored, values below --gt-offset are background,
value v is class id v - offset. Background pixels are scored only when the vocabulary
has a "background" class (pseudolabel --background); otherwise they are ignored.

Reports per-class IoU, mIoU and pixel accuracy for every round and source (maskclip:
MaskCLIP alone; sam: SAM-refined; student: the self-training head of round k) as a
table, and writes OUT/eval/EVAL_ID.parquet and the summary OUT/eval/_EVAL_ID.json.

\b
Examples:
  batchseg evaluate out/ --gt gt_masks/                  # VOC style: 0 background, class k = k+1, 255 ignored
  batchseg evaluate out/ --gt gt_masks/ --gt-offset 0    # values are class ids
  batchseg evaluate out/ --gt instances.json             # COCO instance annotations

{EXIT_CODES_HELP}"""


@cli.command(help=EVALUATE_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--gt", "gt", type=click.Path(path_type=Path), required=True,
              help="Ground truth: a folder of PNG label maps, or a COCO instance .json file.")
@click.option("--ignore-index", type=int, default=EVALUATE_DEFAULTS.ignore_index, show_default=True,
              help="PNG value that is not scored.")
@click.option("--gt-offset", type=int, default=EVALUATE_DEFAULTS.gt_offset, show_default=True,
              help="PNG class id k is stored as k + offset; values below offset are background (VOC: 1).")
def evaluate(out, gt, **options) -> None:
    from batchseg.stages.evaluate import run_evaluate
    from batchseg.stages.evaluate_options import EvaluateOptions

    try:
        report = run_evaluate(EvaluateOptions(**options).config(out, gt))
    except BatchsegError as exc:
        _fail(exc)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(report.text())


EXPORT_HELP = f"""Write the labels of one round of OUT as a dataset in DEST that training code reads.

\b
Formats:
  coco  DEST/annotations/instances_SPLIT.json: RLE masks, boxes, areas, scores
        (Detectron2, MMDetection, pycocotools); category id = class id + 1
  png   DEST/labels/SPLIT/PATH.png: one palette label map per image at original size,
        value = class id, --ignore-value where unlabelled; classes.txt, legend.json
  yolo  DEST/labels/SPLIT/PATH.txt: Ultralytics segmentation polygons (normalised),
        simplified to --tolerance pixels; DEST/data.yaml

Images go to DEST/images/SPLIT/PATH (--images copy, or link for symlinks, or none).
Label rows come from one round (--round, default the last), one source (--source,
default the round's SAM-refined labels) and kind (semantic: one region per class and
image; instance: one per SAM mask), with score at least --min-score. --split val=0.1
puts a stable, seeded tenth of the images (by image id) in a val split. Reruns are
incremental: only label parts not yet exported are read.

\b
Examples:
  batchseg export out/ ds-coco/ --format coco --split val=0.1
  batchseg export out/ ds-yolo/ --format yolo --kind instance --min-score 0.5 --images link
  batchseg export out/ ds-png/ --format png --round 0 --source maskclip --images none

{EXIT_CODES_HELP}"""


@cli.command(help=EXPORT_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True, help="Dataset format.")
@click.option("--round", type=int, default=EXPORT_DEFAULTS.round, help="Label round to export (default: the last).")
@click.option("--source", default=EXPORT_DEFAULTS.source,
              help="Label source: sam, maskclip or student (default: sam when present).")
@click.option("--kind", type=click.Choice(values(LabelKind)), default=EXPORT_DEFAULTS.kind, show_default=True,
              help="Label rows: semantic (one region per class) or instance (one per SAM mask).")
@click.option("--min-score", type=float, default=EXPORT_DEFAULTS.min_score, show_default=True,
              help="Leave out rows scored below this.")
@click.option("--split", default=EXPORT_DEFAULTS.split,
              help="Held-out splits by image id, e.g. val=0.1 or val=0.1,test=0.1.")
@click.option("--seed", type=int, default=EXPORT_DEFAULTS.seed, show_default=True, help="Seed of the split.")
@click.option("--images", type=click.Choice(IMAGE_MODES), default=EXPORT_DEFAULTS.images, show_default=True,
              help="Put the images into DEST: copy them, symlink them, or leave them out.")
@click.option("--src", type=click.Path(path_type=Path, file_okay=False), default=EXPORT_DEFAULTS.src,
              help="Source image folder (default: the one the last embed run read).")
@click.option("--tolerance", type=float, default=EXPORT_DEFAULTS.tolerance, show_default=True,
              help="YOLO: polygon simplification tolerance in pixels (0: every boundary pixel).")
@click.option("--ignore-value", type=int, default=EXPORT_DEFAULTS.ignore_value, show_default=True,
              help="PNG: value of unlabelled pixels.")
@click.option("--overwrite", is_flag=True, help="Replace an export in DEST made with other settings.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(out, dest, fmt, overwrite, quiet, **options) -> None:
    from batchseg.stages.export import run_export
    from batchseg.stages.export_plan import ExportOptions

    try:
        config = ExportOptions(**options).config(out, dest, fmt, overwrite=overwrite)
        summary = run_export(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


REPORT_HELP = f"""Write a static HTML report about the build in OUT to OUT/report/index.html.

One page with its images, no script and nothing fetched: it opens offline in any
browser. It shows the build (files, failures by kind, runs), label statistics per
round (rows per source, class histogram, mean confidence, agreement between rounds),
the latest evaluations (mIoU chart, per-class IoU), qc flags with thumbnails and
students with their metrics when those exist, and a gallery: for each class the
images where it covers the most pixels, drawn with their labels and class names.

\b
Examples:
  batchseg report out/                       # then open out/report/index.html
  batchseg report out/ --round 0 --source maskclip --per-class 8
  batchseg report out/ --src /mnt/photos     # source images moved since embed

{EXIT_CODES_HELP}"""


@cli.command(help=REPORT_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--round", "round_index", type=int, default=None, help="Gallery round (default: the last).")
@click.option("--source", default=None, help="Gallery label source (default: sam when present).")
@click.option("--per-class", type=int, default=REPORT_DEFAULTS.per_class, show_default=True,
              help="Gallery images per class.")
@click.option("--src", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Source image folder (default: the one the last embed run read).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def report(out, round_index, source, per_class, src, quiet) -> None:
    from batchseg.stages.report import run_report
    from batchseg.stages.report_options import ReportOptions

    options = ReportOptions(round=round_index, source=source, per_class=per_class, src=src)
    try:
        summary = run_report(options.config(out), progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


QC_HELP = f"""Find the images in OUT that should not be trusted, from the stored embeddings.

Reads the global CLIP embeddings that `embed` stored (never the images) and writes
OUT/qc/part-*.parquet: one row per file with each method's outlier score, a flag and
the reason: outlier, near_duplicate (of the image id in near_duplicate_of) or
exact_duplicate (same bytes as the path in exact_duplicate_of). Later stages leave
flagged images out (batchseg.qc.flags.flagged_image_ids).

\b
Methods (on --features, PCA-reduced to at most --max-dim dimensions, robustly scaled):
  rglasso  Robust Graphical Lasso (ADMM): Mahalanobis distance under a sparse precision
           that outlier rows cannot bend (default)
  mogaal   MO-GAAL: 1 - D(x) of a discriminator trained against k generators
  mcd      Minimum Covariance Determinant (scikit-learn MinCovDet): a robust baseline
Near-duplicates: cosine similarity of --dup-features >= --dup-threshold, all pairs
compared exactly; each group keeps its oldest image and flags the others.

The fitted model is kept in OUT/qc/_model.json; a rerun scores only new files with it
and keeps its settings. --refit fits again (and applies changed settings).

\b
Examples:
  batchseg qc out/                                  # rglasso, flag the top 5%
  batchseg qc out/ --method mcd --compare rglasso,mogaal --refit
  batchseg qc out/ --threshold 9.5 --dup-threshold 0.99 --refit
  batchseg qc out/ --features dense-mean --dup-features dense-grid --refit
  python -c "import pandas as pd; print(pd.read_parquet('out/qc').query('flagged'))"

{EXIT_CODES_HELP}"""


@cli.command(help=QC_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--method", type=click.Choice(QC_METHODS), default=None,
              help="Detector whose scores flag outliers.  [default: rglasso]")
@click.option("--compare", default=None, metavar="M1,M2",
              help="Further detectors to score for comparison (columns only, no flags), e.g. mogaal,mcd.")
@click.option("--contamination", type=float, default=None,
              help="Flag this fraction of the fit sample (the threshold is that score quantile).  [default: 0.05]")
@click.option("--threshold", type=float, default=None,
              help="Flag scores above this raw value of --method instead of using --contamination.")
@click.option("--dup-threshold", type=float, default=None,
              help="Cosine similarity from which two images are near-duplicates.  [default: 0.97]")
@click.option("--features", type=click.Choice(QC_FEATURES), default=None,
              help="What the detectors see: the global CLIP embedding, or the dense features averaged over "
                   "the image (dense-mean) or over a 4x4 grid (dense-grid).  [default: global]")
@click.option("--dup-features", type=click.Choice(QC_FEATURES), default=None,
              help="What near-duplicates are compared on (dense-grid keeps the layout: crops and re-encodes "
                   "of one image match, other images with the same content do not).  [default: global]")
@click.option("--max-dim", type=int, default=None, help="Largest reduced dimension.  [default: 32]")
@click.option("--fit-sample", type=int, default=None,
              help="Fit the detectors on at most this many images (seeded sample).  [default: 20000]")
@click.option("--seed", type=int, default=None, help="Seed of the fit sample, MCD and MO-GAAL.  [default: 0]")
@click.option("--refit", is_flag=True, help="Fit the model again and rescore every file.")
@click.option("--threads", type=int, default=None, help="Torch threads (MO-GAAL).  [default: torch's]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def qc(out, method, compare, contamination, threshold, dup_threshold, features, dup_features, max_dim, fit_sample,
       seed, refit, threads, quiet) -> None:
    from batchseg.errors import UsageError
    from batchseg.qc.settings import QcSettings
    from batchseg.stages.qc import QcConfig, run_qc

    try:
        if not out.exists():
            raise UsageError(f"output folder {out} does not exist; run `batchseg embed SRC {out}` first")
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        if contamination is not None and threshold is not None:
            raise UsageError("give at most one of --contamination and --threshold")
        given = {name: value for name, value in (
            ("method", method), ("contamination", contamination), ("threshold", threshold),
            ("dup_threshold", dup_threshold), ("features", features), ("dup_features", dup_features),
            ("max_dim", max_dim), ("fit_sample", fit_sample), ("seed", seed),
        ) if value is not None}
        if compare is not None:
            given["compare"] = tuple(name.strip() for name in compare.split(",") if name.strip())
        if threshold is not None:
            given["contamination"] = None
        elif contamination is not None:
            given["threshold"] = None
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        config = QcConfig(out=out, settings=QcSettings(**given), given=frozenset(given), refit=refit)
        summary = run_qc(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


TRAIN_STUDENT_HELP = f"""Train a small deployable model on the pseudo labels of OUT (it learns from pixels).

Reads each labelled image through the manifest (the same safe decoder as embed) and
the label rows of round K (default: the last round; --source auto learns from SAM's
refinement when the round has it). Label rows scoring below --conf-thresh are ignored.
Augmentation (flip, scale jitter, crop) and everything else random follow --seed.

The semantic student (MaskCLIP+) is a compact CNN whose classifier is the frozen
CLIP text embeddings of the classes plus a learnable background embedding; --blocks
picks its blocks: conv, attention (softmax), dynamic (ReLU + LayerNorm attention,
"ViTs as dynamic convolutions") or dynamic-dw (its depth-wise variant). The instance
student is YOLACT (32 prototypes, Fast NMS; --nms noh adds NOH-NMS for crowds),
learnt from the round's instance rows (SAM masks recognised by CLIP). The sam-encoder
student (EdgeSAM) is a RepViT-like CNN distilled from the stored SAM embeddings: pixel-wise
MSE first, then --prompt-epochs with the teacher's frozen prompt encoder and mask decoder
in the loop (box and point prompts from the round's instance labels and the teacher's own
masks, refined twice from the error region). Its folder is a SAM model folder:
`batchseg embed SRC NEW_OUT --sam-model OUT/students/NAME` embeds with it.

Writes OUT/students/NAME/: model.safetensors, config.json (architecture, classes,
input size, normalisation, the round and label settings), metrics/part-*.parquet
(one row per epoch) and _checkpoints/ (one per epoch). Killed or interrupted, the
same command resumes from the last finished epoch and ends with the same weights;
run again when finished, it does nothing.

\b
Examples:
  batchseg train-student out/ --kind semantic --name small --epochs 30
  batchseg train-student out/ --name dyn --blocks dynamic --round 0 --conf-thresh 0.6
  batchseg train-student out/ --name pets --classes "cat,dog,background" --images /mnt/photos
  batchseg train-student out/ --kind instance --name yolact --nms noh --epochs 40
  batchseg train-student out/ --kind sam-encoder --name fast-sam --epochs 16 --prompt-epochs 4

{EXIT_CODES_HELP}"""


@cli.command("train-student", help=TRAIN_STUDENT_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--kind", type=click.Choice(values(StudentKind)), default=TRAIN_STUDENT_DEFAULTS.kind, show_default=True,
              help="What the student predicts: a semantic map (MaskCLIP+), instances (YOLACT), or SAM's image "
                   "embedding (EdgeSAM: a CNN distilled from the stored SAM embeddings, a SAM model folder).")
@click.option("--name", required=True, help="Folder name of the student under OUT/students/.")
@click.option("--round", type=int, default=TRAIN_STUDENT_DEFAULTS.round, help="Label round to learn from (default: the last).")
@click.option("--source", type=click.Choice(TRAIN_SOURCES), default=TRAIN_STUDENT_DEFAULTS.source, show_default=True,
              help="Which labels of the round: auto = SAM refinement when present.")
@click.option("--classes", default=TRAIN_STUDENT_DEFAULTS.classes, help="Comma-separated subset of the build's classes (default: all).")
@click.option("--conf-thresh", type=float, default=TRAIN_STUDENT_DEFAULTS.conf_thresh, show_default=True,
              help="Ignore label rows whose score (mean confidence of the segment) is below this.")
@click.option("--class-balance", type=float, default=TRAIN_STUDENT_DEFAULTS.class_balance, show_default=True,
              help="Semantic: loss weight per class (pixel frequency)^-this; 0 = unweighted.")
@click.option("--blocks", type=click.Choice(BLOCK_KINDS), default=TRAIN_STUDENT_DEFAULTS.blocks,
              show_default=True, help="Backbone blocks.")
@click.option("--width", type=int, default=TRAIN_STUDENT_DEFAULTS.width, show_default=True, help="Channels of the stride-8 blocks.")
@click.option("--depth", type=int, default=TRAIN_STUDENT_DEFAULTS.depth, show_default=True,
              help="Number of blocks (sam-encoder: of the stride-16 stage).")
@click.option("--input-size", type=int, default=TRAIN_STUDENT_DEFAULTS.input_size, show_default=True,
              help="Square input canvas (multiple of 8).")
@click.option("--nms", type=click.Choice(NMS_KINDS), default=TRAIN_STUDENT_DEFAULTS.nms, show_default=True,
              help="Instance students: NMS at prediction, Fast NMS or NOH-NMS (crowds).")
@click.option("--nms-thresh", type=float, default=TRAIN_STUDENT_DEFAULTS.nms_thresh, show_default=True,
              help="Instance students: NMS IoU threshold.")
@click.option("--epochs", type=int, default=TRAIN_STUDENT_DEFAULTS.epochs, show_default=True, help="Training epochs.")
@click.option("--prompt-epochs", type=int, default=TRAIN_STUDENT_DEFAULTS.prompt_epochs,
              help="sam-encoder: how many of the last --epochs are prompt-in-the-loop (phase 2); "
                   "default: a quarter (at least 1).")
@click.option("--batch-size", type=int, default=TRAIN_STUDENT_DEFAULTS.batch_size, show_default=True, help="Images per step.")
@click.option("--lr", type=float, default=TRAIN_STUDENT_DEFAULTS.lr, show_default=True,
              help="Peak learning rate (AdamW, cosine decay).")
@click.option("--seed", type=int, default=TRAIN_STUDENT_DEFAULTS.seed, show_default=True,
              help="Seed of initialisation, order and augmentation.")
@click.option("--no-flip", is_flag=True, help="No horizontal flips.")
@click.option("--scale-jitter", type=(float, float), default=TRAIN_STUDENT_DEFAULTS.scale_jitter, show_default=True,
              help="Range of the random rescaling before the crop.")
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=TRAIN_STUDENT_DEFAULTS.images,
              help="Folder the images are in now, when it is not the folder embed read.")
@cluster_options(gpus="One local worker per GPU (training uses one).", threads="Torch threads of the training worker.")
@click.option("--include-flagged", is_flag=True, help="Also learn from images `batchseg qc` flagged (left out by default).")
@click.option("--overwrite", is_flag=True, help="Delete this student (and its checkpoints) first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_student(out, name, cluster, overwrite, quiet, **options) -> None:
    from batchseg.stages.train_student import run_train_student
    from batchseg.stages.train_student_options import TrainStudentOptions

    try:
        # A sam-encoder refuses the options its teacher fixes only when they are typed, not their defaults.
        source = click.get_current_context().get_parameter_source
        given = {option for option in options if source(option) == click.core.ParameterSource.COMMANDLINE}
        config = TrainStudentOptions(**options).config(out, name, cluster, given=given, overwrite=overwrite)
        summary = run_train_student(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


PREDICT_HELP = f"""Label the images under SRC with a trained student; write DEST like a build.

STUDENT is a student folder (OUT/students/NAME). Images are found, hashed and decoded
as embed does (unusable files and duplicates become manifest rows); the student runs
on shards of images on the Dask workers. DEST gets manifest/part-*.parquet and
labels/round=0/part-*.parquet in the schemas pseudolabel writes (source "student"),
so `batchseg evaluate DEST --gt ...` and the later stages read it unchanged. Reruns
are incremental: only new or changed images are labelled.

\b
Examples:
  batchseg predict out/students/small new_photos/ labelled/
  batchseg predict out/students/small new_photos/ labelled/ --workers 2 --batch-size 16
  batchseg evaluate labelled/ --gt gt_masks/

{EXIT_CODES_HELP}"""


@cli.command(help=PREDICT_HELP)
@click.argument("student", type=click.Path(path_type=Path, file_okay=False))
@click.argument("src", type=click.Path(path_type=Path, file_okay=False))
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images per forward pass.")
@click.option("--shard-size", type=int, default=64, show_default=True, help="Images per Dask task (and manifest part).")
@cluster_options()
@click.option("--max-pixels", type=int, default=None, help="Refuse images with more pixels than this.")
@click.option("--overwrite", is_flag=True, help="Start over: delete DEST's manifest and labels first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def predict(student, src, dest, batch_size, shard_size, cluster, max_pixels, overwrite, quiet) -> None:
    from batchseg.io.images import DEFAULT_MAX_PIXELS
    from batchseg.stages.predict import PredictConfig, run_predict

    try:
        config = PredictConfig(student=student, source=src, dest=dest,
                               cluster=cluster,
                               batch_size=batch_size, shard_size=shard_size,
                               max_pixels=max_pixels or DEFAULT_MAX_PIXELS, overwrite=overwrite)
        summary = run_predict(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


EXPORT_STUDENT_HELP = f"""Export a trained student for deployment: ONNX or TorchScript.

The exported model takes letterboxed RGB pixels, float32 (B, 3, S, S) in 0..255
(longest side resized to S = config.json's input_size, padded bottom/right with 0),
and returns class probabilities (B, K, S, S) in config.json's output order. The batch
size is dynamic; normalisation is inside the model. Written next to the weights
unless --output says otherwise.

\b
Examples:
  batchseg export-student out/students/small --format onnx
  batchseg export-student out/students/small --format torchscript --output deploy/small.pt

{EXIT_CODES_HELP}"""


@cli.command("export-student", help=EXPORT_STUDENT_HELP)
@click.argument("student", type=click.Path(path_type=Path, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(STUDENT_EXPORT_FORMATS), default="onnx", show_default=True,
              help="File format.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write (default: STUDENT/model.onnx or STUDENT/model.torchscript.pt).")
def export_student(student, fmt, output) -> None:
    from batchseg.students.export import export_student as run_export

    try:
        path = run_export(student, fmt, output)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(f"export-student: wrote {path} ({path.stat().st_size / 2**20:.2f} MB)")


BUILD_HELP = f"""Build a whole dataset from one pipeline file: every stage, in order, on one Dask cluster.

PIPELINE.yaml names the sources (folders or globs), the output folder, the models, the
cluster and one section per stage (embed, qc, pseudolabel, evaluate, train-student,
export, report) with its options under their CLI flag names; see pipelines/demo.yaml
and pipelines/nightly.example.yaml. Relative paths are relative to the file's folder.

Incremental, for cron: a stage whose inputs and settings did not change is skipped
from file listings alone (a run with nothing new takes seconds); otherwise it computes
only what is missing: new images are embedded, scored and labelled; self-training
heads and students retrain per the file's retrain policy (always | never | fraction).
One build per output folder at a time (exit 75); every run writes OUT/runs/RUN_ID.log
and OUT/runs/RUN_ID.json (per-stage counts and timings; a copy in OUT/last-build.json).
Progress bars only on a terminal; otherwise one summary line per stage.

\b
Examples:
  batchseg build pipelines/nightly.yaml
  batchseg build pipelines/nightly.yaml --dry-run
  batchseg build pipelines/nightly.yaml --from pseudolabel
  batchseg build pipelines/demo.yaml --set out=/tmp/demo --set pseudolabel.rounds=1
  # crontab: nightly at 02:30
  30 2 * * * cd /srv/batchseg && .venv/bin/batchseg build pipelines/nightly.yaml

{EXIT_CODES_HELP}"""


@cli.command(help=BUILD_HELP)
@click.argument("pipeline_file", metavar="PIPELINE.yaml", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print what each stage would compute; change nothing.")
@click.option("--from", "from_stage", default=None, metavar="STAGE", help="Start at this stage (the ones before are not run).")
@click.option("--only", default=None, metavar="STAGE", help="Run this stage only.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of the file, e.g. out=/tmp/x or pseudolabel.rounds=1 (value read as YAML; "
                   "relative paths from the working folder). Repeatable.")
@cluster_options(local=False, scheduler=f"Address of an existing Dask scheduler (overrides the file) [env: {SCHEDULER_ENV}].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, even on a terminal.")
def build(pipeline_file, dry_run, from_stage, only, overrides, scheduler, quiet) -> None:
    from batchseg.pipeline.spec import load_pipeline
    from batchseg.stages.build import BuildOptions, dry_run as plan_build, run_build

    try:
        pipeline = load_pipeline(pipeline_file, tuple(overrides), scheduler)
        interactive = sys.stdout.isatty() and sys.stderr.isatty() and not quiet
        options = BuildOptions(dry_run=dry_run, from_stage=from_stage, only=only, progress=interactive)
        if dry_run:
            plan_build(pipeline, options, echo=click.echo)
            return
        summary = run_build(pipeline, options, echo=click.echo)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


def _quiet_libraries() -> None:
    # One plain format for library warnings (open_clip, Dask) on stderr.
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    _quiet_libraries()
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to finish (committed work is kept)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
