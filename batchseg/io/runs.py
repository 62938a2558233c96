"""Run ids and run records: ``OUT/runs/RUN_ID.json``, one per run of every command.

Every command records its runs the same way, through :func:`recorded_run`: the record
is written when the run starts (status ``running``, so a run killed outright still
leaves its trace), the stage adds its counts, and it is written again when the run
ends, ``finished``, ``failed`` (with the error's kind and message) or ``interrupted``.

Shared fields: ``run_id``, ``command``, ``argv``, ``status``, ``error`` (``"Kind:
message"``), ``error_kind``, ``config`` (the stage's settings as it saves them),
``versions``, ``host``, ``started_at``, ``finished_at``, ``seconds``, ``counts``; a
command may add its own (qc's ``model``, build's ``stages``). Readers:
``io.build_info.embed_source`` and ``students.data.source_folders`` (embed's
``config.source``), ``report.collect.read_runs``, ``stages.build`` (``last-build.json``).

Import-light (no torch, no zarr): ``export`` and ``report`` start without loading torch.
"""
from __future__ import annotations

import datetime as dt
import platform
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import batchseg
from batchseg.io.files import write_json_atomic
from batchseg.io.statuses import RunStatus  # noqa: F401  (re-exported: the stages import it from here)

RUNS_FOLDER = "runs"


def new_run_id() -> str:
    """A UTC timestamp and a short random suffix, e.g. ``20250101T120000Z-1a2b3c``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_record_path(out: Path, run_id: str) -> Path:
    return out / RUNS_FOLDER / f"{run_id}.json"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _torch_version() -> str | None:
    """torch's version, without importing torch when this run did not need it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    return {"batchseg": batchseg.__version__, "python": platform.python_version(), "torch": _torch_version()}


class RunRecorder:
    """One run's record, written to ``OUT/runs/RUN_ID.json`` on every :meth:`write`."""

    def __init__(self, out: Path, command: str, config: Mapping[str, Any], run_id: str | None = None) -> None:
        self.out = out
        self.run_id = run_id or new_run_id()
        self._clock = time.perf_counter()
        self.record: dict[str, Any] = {
            "run_id": self.run_id,
            "command": command,
            "argv": list(sys.argv),
            "status": RunStatus.RUNNING.value,
            "error": None,
            "error_kind": None,
            "config": dict(config),
            "versions": _versions(),
            "host": platform.node(),
            "started_at": _now(),
            "finished_at": None,
            "seconds": None,
            "counts": {},
        }

    @property
    def path(self) -> Path:
        return run_record_path(self.out, self.run_id)

    def add_counts(self, counts: Mapping[str, Any] | None = None, **more: Any) -> None:
        """What the run did (images, rows, files...); kept in a failed run's record too."""
        self.record["counts"].update(counts or {}, **more)

    def add_summary(self, summary: Any, leave_out: tuple[str, ...] = ()) -> None:
        """A stage's summary dataclass as counts, less its run id and the fields in ``leave_out``."""
        self.add_counts({k: v for k, v in asdict(summary).items() if k != "run_id" and k not in leave_out})

    def set(self, **fields: Any) -> None:
        """Fields of this command's own beside the shared ones (never the shared ones)."""
        shared = set(fields) & {"run_id", "command", "status", "error", "error_kind", "started_at", "finished_at",
                                "seconds", "counts"}
        if shared:
            raise ValueError(f"run record fields {sorted(shared)} are set by the recorder")
        self.record.update(fields)

    def finish(self, error: BaseException | None = None) -> None:
        """Write the final record: finished, or failed / interrupted by ``error``."""
        if error is None:
            status = RunStatus.FINISHED
        elif isinstance(error, KeyboardInterrupt):
            status = RunStatus.INTERRUPTED
        else:
            status = RunStatus.FAILED
        self.record.update(
            status=status.value,
            error=None if error is None else f"{type(error).__name__}: {error}",
            error_kind=None if error is None else type(error).__name__,
            finished_at=_now(),
            seconds=time.perf_counter() - self._clock,
        )
        self.write()

    def write(self) -> None:
        # A record never creates the folder it describes (export only reads its OUT).
        if self.out.is_dir():
            write_json_atomic(self.path, self.record, default=str)


@contextmanager
def recorded_run(out: Path, command: str, config: Mapping[str, Any], run_id: str | None = None
                 ) -> Iterator[RunRecorder]:
    """Record the run of ``command`` in ``OUT/runs``: ``running`` now, then how it ended.

    An exception (``KeyboardInterrupt`` included) is recorded and raised again unchanged.
    """
    recorder = RunRecorder(out, command, config, run_id)
    recorder.write()
    try:
        yield recorder
    except BaseException as exc:
        recorder.finish(exc)
        raise
    recorder.finish()
