"""What later stages call to leave untrusted images out: the flagged image ids of a build."""
from __future__ import annotations

from pathlib import Path

from batchseg.io.qc_table import REASON_EXACT_DUPLICATE, read_qc


def flagged_image_ids(out: Path) -> frozenset[str]:
    """Image ids that `batchseg qc` flagged (outliers, near-duplicates) in build ``out``.

    Empty when ``out`` has no qc table. Exact duplicates are not in the set: they share
    the image id of the file whose bytes were embedded, which is computed (and used)
    once anyway. Raises ``SchemaVersionError`` (a ``UsageError``) for a table of an
    unknown schema version.
    """
    table = read_qc(Path(out))
    if table.num_rows == 0:
        return frozenset()
    return frozenset(
        row["image_id"]
        for row in table.select(["image_id", "flagged", "reason"]).to_pylist()
        if row["flagged"] and row["reason"] != REASON_EXACT_DUPLICATE
    )
