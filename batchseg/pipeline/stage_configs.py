"""One pipeline section -> the stage's own frozen config, with the CLI's defaults.

Where a stage has an options class (``stages/*_options``, ``export_plan.ExportOptions``)
the builder fills it from the section as ``batchseg.cli`` fills it from the command
line, so both get one set of defaults and conversions; each builder then runs the
stage's own ``validate()`` (against a throw-away folder when it checks OUT), so a file
and a command line are held to the same rules. Messages name the file, line and key.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from batchseg.cluster import ClusterSettings
from batchseg.config import PseudolabelConfig
from batchseg.errors import UsageError
from batchseg.pipeline.spec import _validated, detached_build
from batchseg.pipeline.yaml_file import KeyPath, YamlDocument


def _check_detached(doc: YamlDocument, where: KeyPath, config) -> None:
    folder = detached_build()
    try:
        fields = {f.name for f in dataclasses.fields(config)}
        probe = dataclasses.replace(config, out=folder) if "out" in fields else config
        _validated(doc, where, probe.validate)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def qc(doc: YamlDocument, where: KeyPath, out: Path, given: dict[str, Any]):
    from batchseg.qc.settings import QcSettings
    from batchseg.stages.qc import QcConfig

    values = dict(given)
    if "contamination" in values and "threshold" in values:
        raise doc.error(where, "give at most one of contamination and threshold")
    if "threshold" in values:
        values["contamination"] = None
    elif "contamination" in values:
        values["threshold"] = None
    if "compare" in values:
        values["compare"] = tuple(n.strip() for item in values["compare"] for n in item.split(",") if n.strip())
    # The file is the whole truth: a key left out means its default (not "whatever the stored
    # model was fitted with", as for `batchseg qc`), so deleting a key refits too.
    config = QcConfig(out=out, settings=QcSettings(**values),
                      given=frozenset(f.name for f in dataclasses.fields(QcSettings)))
    _check_detached(doc, where, config)
    return config


VOCABULARY_KEYS = ("classes", "vocab", "templates")  # read here; every other key is a PseudolabelOptions field


def pseudolabel(doc: YamlDocument, where: KeyPath, out: Path, cluster: ClusterSettings, given: dict[str, Any],
                retrain: str, retrain_fraction: float) -> PseudolabelConfig:
    from batchseg.stages.pseudolabel_options import PseudolabelOptions
    from batchseg.models.vocabulary import MASKCLIP_TEMPLATES, load_templates, load_vocab_file, parse_classes

    if ("classes" in given) == ("vocab" in given):
        raise doc.error(where, "give the classes with exactly one of classes (a list, or \"cat,dog|puppy\") "
                               "or vocab (a file, one class per line)")
    try:
        vocabulary = (parse_classes(",".join(given["classes"])) if "classes" in given
                      else load_vocab_file(given["vocab"]))
    except UsageError as exc:
        raise doc.error(where + ("classes" if "classes" in given else "vocab",), str(exc)) from None
    try:
        templates = load_templates(given["templates"]) if "templates" in given else MASKCLIP_TEMPLATES
    except UsageError as exc:
        raise doc.error(where + ("templates",), str(exc)) from None
    try:
        options = PseudolabelOptions(**{k: v for k, v in given.items() if k not in VOCABULARY_KEYS})
        config = options.config(out, vocabulary, templates, cluster, retrain=retrain, retrain_fraction=retrain_fraction)
    except UsageError as exc:
        raise doc.error(where, str(exc)) from None
    _check_detached(doc, where, config)
    return config


def evaluate(doc: YamlDocument, where: KeyPath, out: Path, given: dict[str, Any]):
    from batchseg.stages.evaluate_options import EvaluateOptions

    config = EvaluateOptions(**{k: v for k, v in given.items() if k != "gt"}).config(out, given["gt"])
    if not config.gt.exists():
        raise doc.error(where + ("gt",), f"ground truth {config.gt} does not exist")
    _check_detached(doc, where, config)
    return config


def student(doc: YamlDocument, where: KeyPath, out: Path, cluster: ClusterSettings, given: dict[str, Any]):
    from batchseg.stages.train_student_options import CLASSES_EMPTY, TrainStudentOptions

    options = TrainStudentOptions(**{k: v for k, v in given.items() if k != "name"})
    try:
        options.class_subset()
    except UsageError:
        raise doc.error(where + ("classes",), CLASSES_EMPTY) from None
    try:
        config = options.config(out, given["name"], cluster, given=given)
    except UsageError as exc:
        raise doc.error(where, str(exc)) from None
    _check_detached(doc, where, config)
    return config


def export(doc: YamlDocument, where: KeyPath, out: Path, given: dict[str, Any]):
    from batchseg.stages.export_plan import ExportOptions

    options = ExportOptions(**{k: v for k, v in given.items() if k not in ("dest", "format")})
    try:
        options.split_pairs()
    except UsageError as exc:
        raise doc.error(where + ("split",), str(exc)) from None
    dest = given["dest"]
    if dest.resolve() == out.resolve() or out.resolve() in dest.resolve().parents:
        raise doc.error(where + ("dest",), f"the export destination {dest} must be outside the output folder {out}")
    config = options.config(out, dest, given["format"])
    _check_detached(doc, where, config)
    return config


def report(doc: YamlDocument, where: KeyPath, out: Path, given: dict[str, Any]):
    from batchseg.stages.report_options import ReportOptions

    config = ReportOptions(**given).config(out)
    _check_detached(doc, where, config)
    return config
