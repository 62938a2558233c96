"""The `batchseg` command line: parse options, call a stage, map errors to exit codes."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from batchseg.errors import BatchsegError

EXIT_CODES_HELP = """\b
Exit codes:
  0   finished (unusable images are manifest rows, not failures)
  1   the run failed
  2   usage error (bad options or input, settings that contradict OUT)
  75  another run holds the lock on OUT
"""


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
  # a model folder in open_clip's local-dir format, CLIP only, 4 GPUs
  batchseg embed photos/ out/ --clip-model local-dir:models/clip --no-sam --gpus 4
  # join an existing Dask cluster (or set DASK_SCHEDULER_ADDRESS)
  batchseg embed /data/photos /data/out --scheduler tcp://10.0.0.5:8786 ...

{EXIT_CODES_HELP}"""


@cli.command(help=EMBED_HELP)
@click.argument("src", type=click.Path(path_type=Path, file_okay=False))
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--clip-model", default="ViT-B-16", show_default=True,
              help="open_clip model name, or local-dir:PATH (open_clip_config.json + weights).")
@click.option("--clip-pretrained", default=None,
              help="open_clip pretrained tag or a checkpoint file (default: openai for named models; "
                   "none for local-dir), or 'random' (speed tests only).")
@click.option("--dense-form", type=click.Choice(["official", "clear"]), default="official", show_default=True,
              help="MaskCLIP value path: official (residual + MLP, as the paper) or clear (ClearCLIP: no residual/MLP).")
@click.option("--no-clip", is_flag=True, help="Do not compute CLIP features.")
@click.option("--canvas", type=int, default=None,
              help="CLIP input size in pixels (square, letterboxed); default: the model's own size.")
@click.option("--sam-model", type=click.Choice(["vit_b", "vit_l", "vit_h", "tiny"]), default="vit_b", show_default=True,
              help="SAM architecture.")
@click.option("--sam-checkpoint", default=None,
              help="SAM weights (.pth as released, or .safetensors), or 'random' (speed tests only).")
@click.option("--no-sam", is_flag=True, help="Do not compute SAM embeddings.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="bf16", show_default=True,
              help="Forward-pass precision (stored values are fp16 either way).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images per forward pass.")
@click.option("--shard-size", type=int, default=64, show_default=True,
              help="Images per Dask task (and per manifest part).")
@click.option("--workers", type=int, default=1, show_default=True, help="CPU worker processes of the local cluster.")
@click.option("--gpus", type=int, default=0, show_default=True, help="One local worker per GPU (pinned).")
@click.option("--threads", type=int, default=None, help="Torch threads per worker; default: cores / workers.")
@click.option("--scheduler", envvar="DASK_SCHEDULER_ADDRESS", default=None,
              help="Address of an existing Dask scheduler to use instead of a local cluster [env: DASK_SCHEDULER_ADDRESS].")
@click.option("--max-pixels", type=int, default=None,
              help="Refuse images with more pixels than this (decompression bombs). Default: about 179 million.")
@click.option("--overwrite", is_flag=True, help="Start over: delete this build's outputs in OUT first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def embed(src, out, clip_model, clip_pretrained, dense_form, no_clip, canvas, sam_model, sam_checkpoint, no_sam,
          precision, batch_size, shard_size, workers, gpus, threads, scheduler, max_pixels, overwrite, quiet) -> None:
    from batchseg.config import ClusterSettings, EmbedConfig, ModelSettings
    from batchseg.errors import UsageError
    from batchseg.io.images import DEFAULT_MAX_PIXELS
    from batchseg.models.clip import ClipSpec
    from batchseg.models.sam import SamSpec
    from batchseg.stages.embed import run_embed

    try:
        if not no_sam and sam_checkpoint is None:
            raise UsageError(
                "SAM needs weights: pass --sam-checkpoint PATH (e.g. sam_vit_b_01ec64.pth), "
                "or --no-sam to compute CLIP features only"
            )
        models = ModelSettings(
            clip=None if no_clip else ClipSpec(clip_model, _pretrained_tag(clip_model, clip_pretrained), dense_form),
            sam=None if no_sam else SamSpec(sam_model, None if sam_checkpoint == "random" else sam_checkpoint),
            clip_canvas=canvas,
            precision=precision,
        )
        config = EmbedConfig(
            source=src,
            out=out,
            models=models,
            cluster=ClusterSettings(scheduler=scheduler, workers=workers, gpus=gpus, torch_threads=threads),
            batch_size=batch_size,
            shard_size=shard_size,
            max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
            overwrite=overwrite,
        )
        summary = run_embed(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


PSEUDOLABEL_HELP = f"""Label every embedded image in OUT without annotation.

Round 0: MaskCLIP labels from the stored CLIP dense features (prompt denoising, key
smoothing), SAM everything-mode masks decoded from the stored SAM embeddings and
recognised with CLIP (instance rows), SAM masks voting the semantic map. Rounds
1..N: a light head trained on the previous round's confident labels predicts every
image again (MaskCLIP+ self-training). No image is re-encoded.

Writes OUT/labels/round=K/part-*.parquet (COCO RLE masks in original pixels) and
OUT/labels/round=K/_round.json (statistics). Reruns skip complete rounds; changing
the classes or settings recomputes what they affect.

\b
Examples:
  batchseg pseudolabel out/ --classes "cat,dog|puppy,sofa" --rounds 3
  batchseg pseudolabel out/ --vocab classes.txt --background --no-sam --rounds 0
  batchseg pseudolabel out/ --classes "car,road,tree" --no-key-smoothing   # ablation

{EXIT_CODES_HELP}"""


@cli.command(help=PSEUDOLABEL_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--classes", default=None, help='Comma-separated classes; synonyms with "|": "cat|kitten,dog".')
@click.option("--vocab", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File with one class per line (synonyms with |, # comments).")
@click.option("--templates", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Prompt templates, one per line with {} (default: MaskCLIP's 85).")
@click.option("--background", is_flag=True, help='Add "background" as a text class.')
@click.option("--bg-floor", type=float, default=None, help="Leave pixels unlabelled whose best probability is below this.")
@click.option("--pd-thresh", type=float, default=0.5, show_default=True,
              help="Prompt denoising: drop a class whose max probability in the image is below this.")
@click.option("--no-prompt-denoising", is_flag=True, help="Switch prompt denoising off.")
@click.option("--no-key-smoothing", is_flag=True, help="Switch key smoothing off.")
@click.option("--sam/--no-sam", "sam", default=None, help="Use the stored SAM embeddings (default: when stored).")
@click.option("--points-per-side", type=int, default=32, show_default=True, help="SAM everything-mode point grid.")
@click.option("--pred-iou-thresh", type=float, default=0.88, show_default=True, help="Keep SAM masks above this predicted IoU.")
@click.option("--stability-thresh", type=float, default=0.95, show_default=True, help="Keep SAM masks this stable.")
@click.option("--nms-thresh", type=float, default=0.7, show_default=True, help="Fast NMS IoU threshold for SAM masks (on their boxes, then on the masks).")
@click.option("--rounds", type=int, default=3, show_default=True, help="Self-training rounds after round 0.")
@click.option("--conf-thresh", type=float, default=0.5, show_default=True,
              help="Self-training learns only from pixels whose label confidence reaches this.")
@click.option("--class-balance", type=float, default=0.5, show_default=True,
              help="Self-training loss weight per class: (pixel frequency)^-this; 0 = unweighted, 1 = inverse frequency.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Training epochs per round.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the self-training head.")
@click.option("--shard-size", type=int, default=64, show_default=True, help="Images per Dask task.")
@click.option("--workers", type=int, default=1, show_default=True, help="CPU worker processes of the local cluster.")
@click.option("--gpus", type=int, default=0, show_default=True, help="One local worker per GPU (pinned).")
@click.option("--threads", type=int, default=None, help="Torch threads per worker; default: cores / workers.")
@click.option("--scheduler", envvar="DASK_SCHEDULER_ADDRESS", default=None,
              help="Address of an existing Dask scheduler [env: DASK_SCHEDULER_ADDRESS].")
@click.option("--overwrite", is_flag=True, help="Delete all labels in OUT first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def pseudolabel(out, classes, vocab, templates, background, bg_floor, pd_thresh, no_prompt_denoising, no_key_smoothing,
                sam, points_per_side, pred_iou_thresh, stability_thresh, nms_thresh, rounds, conf_thresh, class_balance,
                epochs, seed, shard_size, workers, gpus, threads, scheduler, overwrite, quiet) -> None:
    from batchseg.config import ClusterSettings, LabelSettings, PseudolabelConfig
    from batchseg.errors import UsageError
    from batchseg.labels.proposals import ProposalSettings
    from batchseg.labels.selftrain import SelfTrainSettings
    from batchseg.models.text import MASKCLIP_TEMPLATES, load_templates, load_vocab_file, parse_classes
    from batchseg.stages.pseudolabel import run_pseudolabel

    try:
        if (classes is None) == (vocab is None):
            raise UsageError("give the classes with exactly one of --classes or --vocab")
        if not out.exists():
            raise UsageError(f"output folder {out} does not exist; run `batchseg embed SRC {out}` first")
        try:
            proposals = ProposalSettings(points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                                         stability_score_thresh=stability_thresh, box_nms_thresh=nms_thresh,
                                         mask_nms_thresh=nms_thresh)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        labels = LabelSettings(
            vocabulary=parse_classes(classes) if classes is not None else load_vocab_file(vocab),
            templates=load_templates(templates) if templates else MASKCLIP_TEMPLATES,
            background=background,
            bg_floor=bg_floor,
            key_smoothing=not no_key_smoothing,
            prompt_denoising=not no_prompt_denoising,
            pd_thresh=pd_thresh,
            sam="auto" if sam is None else ("on" if sam else "off"),
            proposals=proposals,
        )
        config = PseudolabelConfig(
            out=out,
            labels=labels,
            selftrain=SelfTrainSettings(epochs=epochs, seed=seed, conf_thresh=conf_thresh,
                                        class_balance=class_balance),
            rounds=rounds,
            cluster=ClusterSettings(scheduler=scheduler, workers=workers, gpus=gpus, torch_threads=threads),
            shard_size=shard_size,
            overwrite=overwrite,
        )
        summary = run_pseudolabel(config, progress=not quiet)
    except BatchsegError as exc:
        _fail(exc)
    click.echo(summary.text())


EVALUATE_HELP = f"""Measure the pseudo labels in OUT against a few hand-labelled images.

GT is a folder of PNG label maps (single-channel L or palette P, read as raw indices;
a/img1.png is matched to image a/img1.jpg, a flat folder by file name) or a COCO
instance JSON (images matched by file_name, categories to the build's classes by name).
PNG values: --ignore-index is not scored, values below --gt-offset are background,
value v is class id v - offset. Background pixels are scored only when the vocabulary
has a "background" class (pseudolabel --background); otherwise they are ignored.

Reports per-class IoU, mIoU and pixel accuracy for every round and source (maskclip:
MaskCLIP alone; sam: SAM-refined; student: the self-training head of round k) as a
table, and writes OUT/eval/EVAL_ID.json and OUT/eval/EVAL_ID.parquet.

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
@click.option("--ignore-index", type=int, default=255, show_default=True, help="PNG value that is not scored.")
@click.option("--gt-offset", type=int, default=1, show_default=True,
              help="PNG class id k is stored as k + offset; values below offset are background (VOC: 1).")
def evaluate(out, gt, ignore_index, gt_offset) -> None:
    from batchseg.stages.evaluate import EvaluateConfig, run_evaluate

    try:
        report = run_evaluate(EvaluateConfig(out=out, gt=gt, ignore_index=ignore_index, gt_offset=gt_offset))
    except BatchsegError as exc:
        _fail(exc)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(report.text())


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
learnt from the round's instance rows (SAM masks recognised by CLIP).

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

{EXIT_CODES_HELP}"""


@cli.command("train-student", help=TRAIN_STUDENT_HELP)
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--kind", type=click.Choice(["semantic", "instance"]), default="semantic", show_default=True,
              help="What the student predicts: a semantic map (MaskCLIP+) or instances (YOLACT).")
@click.option("--name", required=True, help="Folder name of the student under OUT/students/.")
@click.option("--round", "round_index", type=int, default=None, help="Label round to learn from (default: the last).")
@click.option("--source", type=click.Choice(["auto", "sam", "student", "maskclip"]), default="auto", show_default=True,
              help="Which labels of the round: auto = SAM refinement when present.")
@click.option("--classes", default=None, help="Comma-separated subset of the build's classes (default: all).")
@click.option("--conf-thresh", type=float, default=0.3, show_default=True,
              help="Ignore label rows whose score (mean confidence of the segment) is below this.")
@click.option("--class-balance", type=float, default=0.5, show_default=True,
              help="Semantic: loss weight per class (pixel frequency)^-this; 0 = unweighted.")
@click.option("--blocks", type=click.Choice(["conv", "attention", "dynamic", "dynamic-dw"]), default="conv",
              show_default=True, help="Backbone blocks.")
@click.option("--width", type=int, default=64, show_default=True, help="Channels of the stride-8 blocks.")
@click.option("--depth", type=int, default=4, show_default=True, help="Number of blocks.")
@click.option("--input-size", type=int, default=128, show_default=True, help="Square input canvas (multiple of 8).")
@click.option("--nms", type=click.Choice(["fast", "noh"]), default="fast", show_default=True,
              help="Instance students: NMS at prediction, Fast NMS or NOH-NMS (crowds).")
@click.option("--nms-thresh", type=float, default=0.5, show_default=True, help="Instance students: NMS IoU threshold.")
@click.option("--epochs", type=int, default=20, show_default=True, help="Training epochs.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images per step.")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation, order and augmentation.")
@click.option("--no-flip", is_flag=True, help="No horizontal flips.")
@click.option("--scale-jitter", type=(float, float), default=(0.75, 1.25), show_default=True,
              help="Range of the random rescaling before the crop.")
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder the images are in now, when it is not the folder embed read.")
@click.option("--workers", type=int, default=1, show_default=True, help="CPU worker processes of the local cluster.")
@click.option("--gpus", type=int, default=0, show_default=True, help="One local worker per GPU (training uses one).")
@click.option("--threads", type=int, default=None, help="Torch threads of the training worker.")
@click.option("--scheduler", envvar="DASK_SCHEDULER_ADDRESS", default=None,
              help="Address of an existing Dask scheduler [env: DASK_SCHEDULER_ADDRESS].")
@click.option("--overwrite", is_flag=True, help="Delete this student (and its checkpoints) first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_student(out, kind, name, round_index, source, classes, conf_thresh, class_balance, blocks, width, depth, input_size,
                  nms, nms_thresh, epochs, batch_size, lr, seed, no_flip, scale_jitter, images, workers, gpus, threads, scheduler,
                  overwrite, quiet) -> None:
    from batchseg.config import ClusterSettings
    from batchseg.errors import UsageError
    from batchseg.stages.train_student import TrainStudentConfig, run_train_student
    from batchseg.students.data import Augment
    from batchseg.students.semantic import SemanticArch
    from batchseg.students.train import TrainSettings
    from batchseg.students.yolact import YolactArch

    try:
        chosen = None
        if classes is not None:
            chosen = tuple(c.strip() for c in classes.split(",") if c.strip())
            if not chosen:
                raise UsageError("--classes is empty: give at least one class name")
        config = TrainStudentConfig(
            out=out, name=name, kind=kind, round=round_index, source=source, classes=chosen,
            conf_thresh=conf_thresh, class_balance=class_balance,
            arch=(YolactArch if kind == "instance" else SemanticArch)(blocks=blocks, width=width, depth=depth,
                                                                       input_size=input_size),
            nms=nms, nms_thresh=nms_thresh,
            train=TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
            augment=Augment(flip=not no_flip, scale=tuple(scale_jitter)),
            images=images,
            cluster=ClusterSettings(scheduler=scheduler, workers=workers, gpus=gpus, torch_threads=threads),
            overwrite=overwrite,
        )
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
@click.option("--workers", type=int, default=1, show_default=True, help="CPU worker processes of the local cluster.")
@click.option("--gpus", type=int, default=0, show_default=True, help="One local worker per GPU (pinned).")
@click.option("--threads", type=int, default=None, help="Torch threads per worker; default: cores / workers.")
@click.option("--scheduler", envvar="DASK_SCHEDULER_ADDRESS", default=None,
              help="Address of an existing Dask scheduler [env: DASK_SCHEDULER_ADDRESS].")
@click.option("--max-pixels", type=int, default=None, help="Refuse images with more pixels than this.")
@click.option("--overwrite", is_flag=True, help="Start over: delete DEST's manifest and labels first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def predict(student, src, dest, batch_size, shard_size, workers, gpus, threads, scheduler, max_pixels, overwrite,
            quiet) -> None:
    from batchseg.config import ClusterSettings
    from batchseg.io.images import DEFAULT_MAX_PIXELS
    from batchseg.stages.predict import PredictConfig, run_predict

    try:
        config = PredictConfig(student=student, source=src, dest=dest,
                               cluster=ClusterSettings(scheduler=scheduler, workers=workers, gpus=gpus,
                                                       torch_threads=threads),
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
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True,
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


def _pretrained_tag(model: str, pretrained: str | None) -> str | None:
    if pretrained is None:
        return None if model.startswith("local-dir:") else "openai"
    return None if pretrained == "random" else pretrained


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
