"""Run ids and run records (``OUT/runs/RUN_ID.json``) for the light, read-mostly commands.

Same id format and record file as `embed` and `pseudolabel` write; kept here, free of
model imports, so `export` and `report` start without loading torch.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

from batchseg.io.files import write_text_atomic


def new_run_id() -> str:
    """A UTC timestamp and a short random suffix, e.g. ``20250101T120000Z-1a2b3c``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def write_json_file(path: Path, data: dict) -> Path:
    """Pretty, sorted JSON written atomically (as ``batchseg.config.write_json_atomic``)."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_run_record(out: Path, run_id: str, record: dict) -> Path:
    return write_json_file(out / "runs" / f"{run_id}.json", {"run_id": run_id, **record})
