"""A pipeline file (``pipelines/NAME.yaml``) validated into the stages' own frozen configs.

Everything is checked here, once, before anything runs: a bad file exits 2 with one
line naming the file, the line and the key. Defaults are the CLI's. Paths are
relative to the pipeline file's folder (``--set`` values: to the working folder).
"""
from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchseg.cluster import ClusterSettings
from batchseg.config import EmbedConfig, PseudolabelConfig
from batchseg.errors import UsageError
from batchseg.pipeline.schema import LISTS, SECTIONS, STAGES, TOP, Checker
from batchseg.pipeline.yaml_file import KeyPath, YamlDocument, read_yaml
from batchseg.stages.embed_options import DEFAULTS as EMBED_DEFAULTS, RANDOM, EmbedOptions


@dataclass(frozen=True)
class Pipeline:
    """One pipeline: where, which models, and each stage's config (None/empty: not run).

    Every stage config's ``cluster`` is the pipeline's; the build replaces it with the
    address of the one cluster it starts."""

    path: Path
    sources: tuple[Path, ...]
    out: Path
    cluster: ClusterSettings
    embed: EmbedConfig
    qc: Any = None  # batchseg.stages.qc.QcConfig
    pseudolabel: PseudolabelConfig | None = None
    evaluate: Any = None  # batchseg.stages.evaluate.EvaluateConfig
    students: tuple = ()  # batchseg.stages.train_student.TrainStudentConfig, in file order
    exports: tuple = ()  # batchseg.stages.export_plan.ExportConfig, in file order
    report: Any = None  # batchseg.stages.report.ReportConfig
    retrain: str = "fraction"
    retrain_fraction: float = 0.1
    lines: dict[str, int] = field(default_factory=dict)  # stage -> line of its section

    def stages(self) -> tuple[str, ...]:
        """The stages this pipeline runs, in order (embed always)."""
        present = {"embed": True, "qc": self.qc is not None, "pseudolabel": self.pseudolabel is not None,
                   "evaluate": self.evaluate is not None, "train-student": bool(self.students),
                   "export": bool(self.exports), "report": self.report is not None}
        return tuple(stage for stage in STAGES if present[stage])


def apply_overrides(doc: YamlDocument, overrides: tuple[str, ...]) -> tuple[YamlDocument, frozenset[KeyPath]]:
    """``KEY=VALUE`` pairs (``pseudolabel.rounds=1``, ``out=/tmp/x``) set into the document;
    VALUE is read as YAML. Returns the new document and the keys set."""
    data = doc.data if isinstance(doc.data, dict) else {}
    lines = dict(doc.key_lines)
    given: dict[KeyPath, str] = dict(doc.overrides)
    for text in overrides:
        name, sep, raw = text.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--set takes KEY=VALUE (e.g. out=/data/out or pseudolabel.rounds=1), got {text!r}")
        where = tuple(int(p) if p.isdigit() else p for p in name.strip().split("."))
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {text}: the value is not valid YAML ({exc})") from None
        target = data
        for part in where[:-1]:
            if isinstance(target, dict):
                target = target.setdefault(part, {})
            elif isinstance(target, list) and isinstance(part, int) and part < len(target):
                target = target[part]
            else:
                raise UsageError(f"--set {text}: {part!r} is not a section of {doc.path}")
            if target is None:
                raise UsageError(f"--set {text}: {part!r} is empty in {doc.path}")
        if isinstance(target, list) and isinstance(where[-1], int) and where[-1] < len(target):
            target[where[-1]] = value
        elif isinstance(target, dict):
            target[where[-1]] = value
        else:
            raise UsageError(f"--set {text}: cannot set {name} in {doc.path}")
        given[where] = text
        lines.setdefault(where, doc.line(where))
    return YamlDocument(doc.path, data, lines, given), frozenset(given)


def load_pipeline(path: Path, overrides: tuple[str, ...] = (), scheduler: str | None = None) -> Pipeline:
    """Read and validate ``path``; ``UsageError`` naming the file, line and key otherwise.

    ``scheduler`` (``--scheduler`` / ``DASK_SCHEDULER_ADDRESS``) replaces the file's."""
    doc = read_yaml(path)
    if doc.data is None:
        raise UsageError(f"{path} is empty: a pipeline needs at least sources, out and models")
    if not isinstance(doc.data, dict):
        raise doc.error((), "a pipeline file is a mapping of keys (sources, out, models, one section per stage)")
    doc, cli_keys = apply_overrides(doc, overrides)
    check = Checker(doc, cli_keys)
    top = check.section((), doc.data, TOP)
    raw = {str(k).replace("_", "-"): k for k in doc.data}
    sections = {name: (check.items if name in LISTS else check.section)((raw[name],), top[name.replace("-", "_")],
                                                                          SECTIONS[name])
                for name in SECTIONS if name.replace("-", "_") in top}
    sources = _sources(check, (raw["sources"],), top["sources"])
    out = top["out"]
    _check_out(doc, (raw["out"],), out, sources)
    cluster = _cluster(doc, (raw.get("cluster", "cluster"),), sections.get("cluster", {}), scheduler)
    options = EmbedOptions(**_models(check, (raw["models"],), sections["models"]), **sections.get("embed", {}))
    _validated(doc, (raw["models"],), options.models().validate)
    root = Path(os.path.commonpath([str(s) for s in sources]))
    embed_config = options.config(root, out, cluster, include=() if sources == (root,) else sources)
    _validated(doc, (raw.get("embed", "embed"),), embed_config.validate)
    retrain = top.get("retrain", "fraction")
    fraction = top.get("retrain_fraction", 0.1)
    if not 0.0 <= fraction <= 100.0:
        raise doc.error((raw["retrain-fraction"],), f"must be in [0, 100], got {fraction}")
    from batchseg.pipeline import stage_configs as make

    where = {name: (raw[name],) for name in SECTIONS if name in raw}

    def item(name: str, index: int) -> KeyPath:
        return where[name] + ((index,) if isinstance(doc.data[raw[name]], list) else ())

    for name, unique in (("train-student", "name"), ("export", "dest")):
        seen: set = set()
        for index, given in enumerate(sections.get(name, [])):
            value = given[unique].resolve() if unique == "dest" else given[unique]
            if value in seen:
                raise doc.error(item(name, index) + (unique,), f"{value} is used twice; each needs its own {unique}")
            seen.add(value)

    return Pipeline(
        path=path, sources=sources, out=out, cluster=cluster, embed=embed_config,
        qc=make.qc(doc, where["qc"], out, sections["qc"]) if "qc" in sections else None,
        pseudolabel=(make.pseudolabel(doc, where["pseudolabel"], out, cluster, sections["pseudolabel"], retrain,
                                      fraction) if "pseudolabel" in sections else None),
        evaluate=make.evaluate(doc, where["evaluate"], out, sections["evaluate"]) if "evaluate" in sections else None,
        students=tuple(make.student(doc, item("train-student", i), out, cluster, given)
                       for i, given in enumerate(sections.get("train-student", []))),
        exports=tuple(make.export(doc, item("export", i), out, given)
                      for i, given in enumerate(sections.get("export", []))),
        report=make.report(doc, where["report"], out, sections["report"]) if "report" in sections else None,
        retrain=retrain, retrain_fraction=fraction,
        lines={name: doc.line(key) for name, key in where.items()},
    )


def _sources(check: Checker, where: KeyPath, entries: tuple[str, ...]) -> tuple[Path, ...]:
    folders: list[Path] = []
    listed = isinstance(check.doc.data.get(where[0]), list)
    for index, entry in enumerate(entries):
        at = where + ((index,) if listed else ())
        pattern = check.path(at, entry)
        if glob.has_magic(str(pattern)):
            matches = sorted(Path(p) for p in glob.glob(str(pattern)) if Path(p).is_dir())
            if not matches:
                raise check.doc.error(at, f"the pattern {entry!r} matches no folder ({pattern})")
        else:
            if not pattern.exists():
                raise check.doc.error(at, f"source folder {pattern} does not exist")
            if not pattern.is_dir():
                raise check.doc.error(at, f"source {pattern} is not a folder")
            matches = [pattern]
        folders.extend(m.resolve() for m in matches)
    unique = tuple(dict.fromkeys(folders))
    for a in unique:
        for b in unique:
            if a != b and a in b.parents:
                raise check.doc.error(where, f"source {b} lies inside source {a}: list each folder once")
    return unique


def _check_out(doc: YamlDocument, where: KeyPath, out: Path, sources: tuple[Path, ...]) -> None:
    resolved = out.resolve()
    if out.exists() and not out.is_dir():
        raise doc.error(where, f"output {out} exists and is not a folder")
    for source in sources:
        if resolved == source or source in resolved.parents:
            raise doc.error(where, f"the output folder {out} is inside the source folder {source}; "
                                   "put it outside every source")
        if resolved in source.parents:
            raise doc.error(where, f"the source folder {source} is inside the output folder {out}")


def _cluster(doc: YamlDocument, where: KeyPath, given: dict[str, Any], scheduler: str | None) -> ClusterSettings:
    settings = ClusterSettings.from_options({**given, "scheduler": scheduler or given.get("scheduler")})
    _validated(doc, where, settings.validate)
    return settings


def _models(check: Checker, where: KeyPath, given: dict[str, Any]) -> dict[str, Any]:
    """The ``models`` section with its paths resolved against the file's folder; an
    :class:`EmbedOptions` turns it into settings as it does the command line's."""
    from batchseg.models.specs import LOCAL_DIR

    values = dict(given)
    clip_model = values.get("clip_model", EMBED_DEFAULTS.clip_model)
    if clip_model.startswith(LOCAL_DIR):
        values["clip_model"] = LOCAL_DIR + str(check.path(where + ("clip-model",), clip_model[len(LOCAL_DIR):]))
    pretrained = values.get("clip_pretrained")
    if (pretrained not in (None, RANDOM) and ("/" in pretrained or "." in pretrained)
            and check.path(where + ("clip-pretrained",), pretrained).exists()):
        values["clip_pretrained"] = str(check.path(where + ("clip-pretrained",), pretrained))
    checkpoint = values.get("sam_checkpoint")
    if not values.get("no_sam") and checkpoint is None:
        raise check.doc.error(where, "SAM needs weights: give sam-checkpoint (e.g. sam_vit_b_01ec64.pth), "
                                     "or no-sam: true to compute CLIP features only")
    if checkpoint not in (None, RANDOM):
        values["sam_checkpoint"] = str(check.path(where + ("sam-checkpoint",), checkpoint))
    return values


def _validated(doc: YamlDocument, where: KeyPath, validate) -> None:
    """Run a stage's own validation; its message gets the file, line and section."""
    try:
        validate()
    except UsageError as exc:
        raise doc.error(where, str(exc)) from None
    except ValueError as exc:
        raise doc.error(where, str(exc)) from None


def detached_build() -> Path:
    """A throw-away folder that passes the stages' "is OUT a build" checks, so their own
    ``validate()`` checks a pipeline's settings before OUT exists (the caller removes it)."""
    folder = Path(tempfile.mkdtemp(prefix="batchseg-validate-"))
    (folder / "manifest").mkdir()
    (folder / "batchseg.json").write_text("{}")
    return folder
