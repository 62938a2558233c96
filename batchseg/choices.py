"""The named choices users pick from, in one import-light place (no torch, no Dask).

The CLI builds its ``click.Choice`` lists (and the pipeline-file schema its choices)
from these tuples, and the library validates against the same tuples, so an option and
its check can never disagree. Tuples whose home is import-light live there instead:
``batchseg.io.statuses`` (label kinds and sources, student kinds),
``batchseg.students.settings`` (backbone blocks, NMS) and ``batchseg.io.files.IMAGE_MODES``.
"""
from __future__ import annotations

# Training-free dense CLIP heads computed at label time (batchseg.models.dense_heads).
DENSE_HEADS = ("maskclip", "value", "clearclip", "sclip", "naclip", "proxy-sam")
# MaskCLIP's key smoothing: "auto" smooths only when no SAM masks vote the map (SAM's
# region vote is the finer smoothing; key smoothing on a coarse grid first blurs away the
# small objects the masks would have kept: bench/RESULTS.md, "key smoothing and SAM").
KEY_SMOOTHING = ("auto", "on", "off")
# How a SAM mask picks its class: "majority" of the per-pixel labels inside it (CorrCLIP's
# region correction), or "pool": argmax of the probabilities pooled inside it (Open-Vocabulary
# SAM's SAM+CLIP baseline).
REGION_VOTES = ("majority", "pool")
# The class name that stands for "no object": `pseudolabel --background` adds it to the
# vocabulary, and `evaluate` scores ground-truth background pixels only when it is there.
BACKGROUND = "background"
# SAM registry names (batchseg.models.sam.SAM_ARCHS has their sizes); anything else given as
# --sam-model is a SAM model folder (batchseg.models.sam_folder).
SAM_MODELS = ("vit_b", "vit_l", "vit_h", "tiny")
# Forward-pass precision of the models (batchseg.models.specs.ModelSettings).
PRECISIONS = ("fp32", "bf16", "fp16")
# `batchseg export --format` (writers in batchseg.export).
EXPORT_FORMATS = ("coco", "png", "yolo")
# `batchseg qc`: outlier detectors (batchseg.qc) and the features they score (batchseg.qc.features).
QC_METHODS = ("rglasso", "mogaal", "mcd")
QC_FEATURES = ("global", "dense-mean", "dense-grid")
# `batchseg export-student --format` (batchseg.students.export).
STUDENT_EXPORT_FORMATS = ("onnx", "torchscript")
# What images added since a self-training head (or a student) was trained do to it:
# always retrain; never (the kept head labels them); fraction (retrain once the added
# images exceed this share of the images it was trained on). A pipeline file's `retrain`.
RETRAIN_POLICIES = ("always", "never", "fraction")
