"""What the report shows, read from a build folder: the build, label rounds, evaluations, qc, students.

Every reader streams or reads small columns, so collecting stays cheap on big builds;
qc and students sections are read only when their folders exist (other stages write
them), and their tables are shown generically, column by column, so the report does
not break when those stages add a column.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from batchseg.io.tables import read_part

from batchseg.io.build_info import ManifestSummary, label_parts, label_rounds, manifest_summary, read_round_file, set_aside_rounds, vocabulary

FLAG_COLUMNS = ("flagged", "flag", "is_outlier", "outlier")
MAX_TABLE_ROWS = 200


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    command: str
    status: str
    finished_at: str


@dataclass(frozen=True)
class RoundInfo:
    round: int
    stats: dict | None  # the "stats" of _round.json: class_histogram, mean_confidence, agreement_with_previous
    images: int  # images with label rows in this round
    rows: dict[tuple[str, str], int]  # (source, kind) -> rows
    mean_score: dict[tuple[str, str], float]


@dataclass(frozen=True)
class Table:
    """A small table to print: column names and rows of plain values."""

    columns: list[str]
    rows: list[dict]
    total_rows: int


@dataclass(frozen=True)
class StudentInfo:
    name: str
    config: dict
    metrics: Table | None


@dataclass(frozen=True)
class ReportData:
    out: Path
    build: ManifestSummary
    runs: list[RunInfo]
    classes: tuple[str, ...]
    rounds: list[RoundInfo]
    evaluations: list[dict]  # evaluate JSON files, oldest first
    qc: Table | None  # None: no OUT/qc folder
    qc_flagged: list[dict] = field(default_factory=list)  # rows flagged by qc (image_id, reason, ...)
    students: list[StudentInfo] | None = None  # None: no OUT/students folder
    set_aside: list[tuple[int, str]] = field(default_factory=list)  # (round, why): rounds the drift rule discarded


def read_runs(out: Path) -> list[RunInfo]:
    runs = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        runs.append(RunInfo(str(record.get("run_id", path.stem)), str(record.get("command", "?")),
                            str(record.get("status", "?")), str(record.get("finished_at") or "")))
    return runs


def round_info(out: Path, round_index: int) -> RoundInfo:
    rows: dict[tuple[str, str], int] = {}
    score_sum: dict[tuple[str, str], float] = {}
    images = 0
    for part in label_parts(out, round_index):
        table = read_part(part, columns=["image_id", "source", "kind", "score"])
        images += len(pc.unique(table.column("image_id")))
        grouped = table.group_by(["source", "kind"]).aggregate([([], "count_all"), ("score", "sum")])
        for row in grouped.to_pylist():
            key = (row["source"], row["kind"])
            rows[key] = rows.get(key, 0) + row["count_all"]
            score_sum[key] = score_sum.get(key, 0.0) + float(row["score_sum"])
    info = read_round_file(out, round_index)
    return RoundInfo(round_index, (info or {}).get("stats"), images, rows,
                     {key: score_sum[key] / rows[key] for key in rows if rows[key]})


def read_evaluations(out: Path, keep: int = 5) -> list[dict]:
    found = []
    for path in sorted((out / "eval").glob("*.json"), key=lambda p: p.name.lstrip("_"))[-keep:]:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            found.append(data)
    return found


def _plain(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return value


def read_table(folder: Path) -> Table | None:
    """All ``part-*.parquet`` of ``folder`` as a Table (first MAX_TABLE_ROWS rows); None if none."""
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        return None
    tables = [read_part(part, identity=False) for part in parts]  # shown as they are
    columns = list(dict.fromkeys(name for t in tables for name in t.column_names))
    rows, total = [], 0
    for table in tables:
        total += table.num_rows
        for row in table.slice(0, max(0, MAX_TABLE_ROWS - len(rows))).to_pylist():
            rows.append({k: _plain(v) for k, v in row.items()})
    return Table(columns, rows, total)


def read_qc(out: Path) -> tuple[Table | None, list[dict]]:
    folder = out / "qc"
    if not folder.is_dir():
        return None, []
    flagged = []
    for part in sorted(folder.glob("part-*.parquet")):
        table = read_part(part, identity=False)
        flag = next((name for name in FLAG_COLUMNS if name in table.column_names), None)
        if flag is None or "image_id" not in table.column_names:
            continue
        hits = table.filter(pc.fill_null(pc.cast(table.column(flag), "bool"), False))
        flagged += [{k: _plain(v) for k, v in row.items()} for row in hits.slice(0, MAX_TABLE_ROWS).to_pylist()]
    return read_table(folder) or Table([], [], 0), flagged


def read_students(out: Path) -> list[StudentInfo] | None:
    folder = out / "students"
    if not folder.is_dir():
        return None
    students = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        config = {}
        if (child / "config.json").is_file():
            try:
                config = json.loads((child / "config.json").read_text())
            except (OSError, json.JSONDecodeError):
                config = {"error": "config.json is not readable JSON"}
        metrics = read_table(child / "metrics") or read_table(child)
        students.append(StudentInfo(child.name, config if isinstance(config, dict) else {}, metrics))
    return students


def collect(out: Path) -> ReportData:
    rounds = label_rounds(out)
    qc, flagged = read_qc(out)
    return ReportData(
        out=out,
        build=manifest_summary(out),
        runs=read_runs(out),
        classes=vocabulary(out, rounds),
        rounds=[round_info(out, k) for k in rounds],
        evaluations=read_evaluations(out),
        qc=qc,
        qc_flagged=flagged,
        students=read_students(out),
        set_aside=set_aside_rounds(out),
    )
