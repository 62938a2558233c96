"""Label rows of one round, streamed one image group at a time.

Memory is bounded by one label part (one pseudolabel shard), never by the round:
``plan_units`` reads only the ``image_id`` column of every part and gives each image to
the first part that holds it (pseudolabel writes all of an image's rows of a round into
one part, but a reader should not depend on it); ``image_groups`` then reads one unit's
rows, filtered by pyarrow, and yields them grouped by image.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchseg.errors import UsageError
from batchseg.io.build_info import check_label_part
from batchseg.io.statuses import SOURCE_PREFERENCE, LabelKind
from batchseg.io.tables import read_part

ROW_COLUMNS = ("image_id", "kind", "segment_id", "class_id", "class_name", "score", "source", "bbox", "area", "mask")


@dataclass(frozen=True)
class LabelFilter:
    """Which label rows to read: one source and kind, scores at least ``min_score``."""

    source: str
    kind: LabelKind = LabelKind.SEMANTIC
    min_score: float = 0.0


@dataclass(frozen=True)
class LabelUnit:
    """A label part and the images it owns (their rows may also sit in ``extra`` parts)."""

    part: Path
    image_ids: frozenset[str]
    extra: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return self.part.stem


def plan_units(parts: list[Path]) -> list[LabelUnit]:
    """One unit per part that owns at least one image; reads only the ``image_id`` column."""
    owner: dict[str, int] = {}
    holders: dict[str, list[int]] = {}
    for index, part in enumerate(parts):
        check_label_part(part)
        ids = pc.unique(read_part(part, columns=["image_id"]).column("image_id")).to_pylist()
        for image_id in ids:
            owner.setdefault(image_id, index)
            holders.setdefault(image_id, []).append(index)
    owned: dict[int, set[str]] = {}
    extra: dict[int, set[int]] = {}
    for image_id, index in owner.items():
        owned.setdefault(index, set()).add(image_id)
        extra.setdefault(index, set()).update(i for i in holders[image_id] if i != index)
    return [
        LabelUnit(parts[i], frozenset(owned[i]), tuple(parts[j] for j in sorted(extra.get(i, ()))))
        for i in sorted(owned)
    ]


def _expression(flt: LabelFilter, image_ids: frozenset[str]) -> ds.Expression:
    return (
        (ds.field("source") == flt.source)
        & (ds.field("kind") == flt.kind)
        & (ds.field("score") >= flt.min_score)
        & ds.field("image_id").isin(pa.array(sorted(image_ids), type=pa.string()))
    )


def image_groups(unit: LabelUnit, flt: LabelFilter) -> Iterator[tuple[str, list[dict]]]:
    """``(image_id, rows)`` for every image the unit owns, rows sorted by segment id.

    Images without a row passing the filter are yielded with an empty list: they were
    labelled in this round, just not with anything kept (an all-ignore label map).
    """
    expression = _expression(flt, unit.image_ids)
    tables = [read_part(path, columns=list(ROW_COLUMNS), filters=expression) for path in (unit.part, *unit.extra)]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    grouped: dict[str, list[dict]] = {image_id: [] for image_id in sorted(unit.image_ids)}
    for row in rows:
        grouped[row["image_id"]].append(row)
    for image_id, image_rows in grouped.items():
        image_rows.sort(key=lambda r: (r["segment_id"], r["class_id"]))
        yield image_id, image_rows


def sources_and_kinds(parts: list[Path]) -> dict[tuple[str, str], int]:
    """Row counts per (source, kind) over ``parts`` (two small columns read)."""
    counts: dict[tuple[str, str], int] = {}
    for part in parts:
        table = read_part(part, columns=["source", "kind"])
        for row in table.group_by(["source", "kind"]).aggregate([([], "count_all")]).to_pylist():
            key = (row["source"], row["kind"])
            counts[key] = counts.get(key, 0) + row["count_all"]
    return counts


def choose_source(available: dict[tuple[str, str], int], kind: str, requested: str | None, round_index: int) -> str:
    """The source to export: ``requested`` if the round has rows of it, else the preferred one."""
    sources = sorted({s for (s, k), n in available.items() if k == kind and n > 0})
    if not sources:
        kinds = sorted({k for (_, k), n in available.items() if n > 0})
        raise UsageError(f"round {round_index} has no {kind} label rows (it has: {', '.join(kinds) or 'none'}); "
                         "choose another --kind or --round")
    if requested is not None:
        if requested not in sources:
            raise UsageError(f"round {round_index} has no {kind} rows from source {requested!r}; "
                             f"--source must be one of: {', '.join(sources)}")
        return requested
    for source in SOURCE_PREFERENCE:
        if source in sources:
            return source
    return sources[0]
