"""One build at a time per output folder (DESIGN rule 5)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from batchseg.errors import LockedError

LOCK_NAME = ".batchseg.lock"


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.batchseg.lock`` for the duration; raise ``LockedError`` at once if taken.

    filelock uses ``flock``, so a run killed with SIGKILL releases the lock with its
    process: a crash never leaves a stale lock that blocks the next cron run.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(
            f"another batchseg run is using {out} (lock {out / LOCK_NAME} is held); "
            "wait for it to finish, or use a different output folder"
        ) from None
    try:
        # Who holds the lock, for a person looking at a stuck build.
        (out / ".batchseg.lock.owner").write_text(f"pid {os.getpid()}\n")
        yield
    finally:
        lock.release()
