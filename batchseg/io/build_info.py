"""What a build folder holds, for the stages that only read it (export, report).

Small readers over files other stages write: the images of the manifest, the label
rounds and their parts, each round's ``_round.json``, the vocabulary, and the source
folder recorded by the last `embed` run. Label parts are found with a ``part-*.parquet``
glob only: round folders may also hold other artefacts, and those may move.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from batchseg.errors import UsageError
from batchseg.io.statuses import USABLE_STATUSES, ImageStatus
from batchseg.io.tables import (
    LABELS_VERSION, check_version, numbered_rounds, read_manifest, read_part, read_schema_checked, round_folder,
)

ROUND_FILE = "_round.json"
BUILD_FILE = "batchseg.json"  # batchseg.config.BUILD_FILE; config is not imported: it loads torch
ROUND_FILE_HOMES = ("selftrain", "labels")  # newest layout first


@dataclass(frozen=True)
class BuildImage:
    """One unique image of a build: its id, the relative path it is exported under, its size."""

    image_id: str
    path: str  # relative to the source folder, POSIX; the first current path of this content
    height: int
    width: int


@dataclass(frozen=True)
class ManifestSummary:
    """Counts of a build's current files (the latest manifest row per path)."""

    files: int
    status_counts: dict[str, int]  # "ok", "duplicate", failure kinds
    images: dict[str, BuildImage]  # unique usable images by image id


def manifest_summary(out: Path) -> ManifestSummary:
    """The build's current files and unique images; a path's latest manifest row wins."""
    rows = read_manifest(out).select(["image_id", "path", "width", "height", "status", "run_id"]).to_pylist()
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in rows if r["status"] == ImageStatus.OK and r["image_id"]}
    latest: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["run_id"] or ""):
        latest[row["path"]] = row
    counts: dict[str, int] = {}
    images: dict[str, BuildImage] = {}
    for path in sorted(latest):
        counts[latest[path]["status"]] = counts.get(latest[path]["status"], 0) + 1
    # The path whose content was computed first; a duplicate's path only when that one is gone.
    for path in sorted(latest, key=lambda p: (latest[p]["status"] != ImageStatus.OK, p)):
        row = latest[path]
        if row["status"] in USABLE_STATUSES and row["image_id"] in sizes and row["image_id"] not in images:
            height, width = sizes[row["image_id"]]
            images[row["image_id"]] = BuildImage(row["image_id"], path, int(height), int(width))
    return ManifestSummary(len(latest), counts, images)


def label_rounds(out: Path) -> list[int]:
    """Round indices that have at least one committed label part, ascending."""
    return [index for index, _ in numbered_rounds(out / "labels") if label_parts(out, index)]


def label_parts(out: Path, round_index: int) -> list[Path]:
    """Committed label parts of one round (``part-*.parquet``), sorted by name.

    Each part's footer is checked: a damaged or stray file, or a part of a schema version
    this code does not read (a newer batchseg's), is refused with the fix, never taken
    as part of a complete round.
    """
    parts = sorted(round_folder(out, round_index).glob("part-*.parquet"))
    for part in parts:
        check_label_part(part)
    return parts


def check_label_part(part: Path) -> None:
    """Refuse a damaged label part, or one of a schema version this code does not read."""
    check_version(read_schema_checked(part), "labels", LABELS_VERSION, part)


def read_json(path: Path) -> dict:
    """A JSON object file; {} when absent; a UsageError naming the file when unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def read_round_file(out: Path, round_index: int) -> dict | None:
    """A round's ``_round.json`` (statistics, settings), wherever the build keeps it; None if absent.

    Looks in ``OUT/selftrain/round=K/`` first, then ``OUT/labels/round=K/``.
    """
    for home in ROUND_FILE_HOMES:
        path = out / home / f"round={round_index}" / ROUND_FILE
        if path.is_file():
            return read_json(path)
    return None


def set_aside_rounds(out: Path) -> list[tuple[int, str]]:
    """(round, why) of each round pseudolabel's drift rule set aside (its labels are not in
    ``labels/``), ascending."""
    found = []
    for index, folder in numbered_rounds(out / "selftrain"):
        info = read_json(folder / ROUND_FILE)
        if info.get("discarded"):
            found.append((index, str((info.get("decision") or {}).get("why", ""))))
    return found


def round_class_names(out: Path, round_index: int) -> dict[int, str]:
    """class id -> class name as the label rows of one round name them (two columns read)."""
    names: dict[int, str] = {}
    for part in label_parts(out, round_index):
        pairs = read_part(part, columns=["class_id", "class_name"]).group_by(["class_id", "class_name"]).aggregate([])
        for pair in pairs.to_pylist():
            if names.setdefault(pair["class_id"], pair["class_name"]) != pair["class_name"]:
                raise UsageError(f"round {round_index} of {out} names class id {pair['class_id']} both "
                                 f"{names[pair['class_id']]!r} and {pair['class_name']!r}; rerun pseudolabel with --overwrite")
    return names


def vocabulary(out: Path, rounds: list[int]) -> tuple[str, ...]:
    """The build's class names by class id: the last pseudolabel run's, else those the label rows name."""
    classes = ((read_json(out / BUILD_FILE).get("pseudolabel") or {}).get("labels") or {}).get("classes")
    if classes:
        return tuple(str(c) for c in classes)
    names: dict[int, str] = {}
    for k in rounds:
        for class_id, name in round_class_names(out, k).items():
            names.setdefault(class_id, name)
    if not names:
        return ()
    return tuple(names.get(cid, f"class_{cid}") for cid in range(max(names) + 1))


def embed_source(out: Path) -> Path | None:
    """The source folder of the last finished `embed` run (from ``OUT/runs``), or None."""
    best: tuple[str, str] | None = None
    runs = out / "runs"
    if not runs.is_dir():
        return None
    for path in runs.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("command") != "embed" or record.get("status") != "finished":
            continue
        source = (record.get("config") or {}).get("source")
        stamp = record.get("finished_at") or ""
        if source and (best is None or stamp > best[0]):
            best = (stamp, source)
    return Path(best[1]) if best else None
