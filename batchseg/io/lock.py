"""One build at a time per output folder (DESIGN rule 5)."""
from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from batchseg.errors import LockedError

LOCK_NAME = ".batchseg.lock"

# Folders whose lock the current context holds *for its nested stages*: `batchseg build`
# holds OUT's lock for the whole run and calls the stages, which take the same lock again.
_nested_ok: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("batchseg_nested_locks", default=frozenset())


def _key(out: Path) -> str:
    return os.path.realpath(out)


@contextmanager
def build_lock(out: Path, allow_nested: bool = False) -> Iterator[None]:
    """Hold ``OUT/.batchseg.lock`` for the duration; raise ``LockedError`` at once if taken.

    filelock uses ``flock``, so a run killed with SIGKILL releases the lock with its
    process: a crash never leaves a stale lock that blocks the next cron run.
    ``allow_nested``: while held, this context (thread) may take the same lock again
    without waiting (the build's stages do); everyone else is still refused.
    """
    out.mkdir(parents=True, exist_ok=True)
    key = _key(out)
    if key in _nested_ok.get():
        yield
        return
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(
            f"another batchseg run is using {out} (lock {out / LOCK_NAME} is held); "
            "wait for it to finish, or use a different output folder"
        ) from None
    token = _nested_ok.set(_nested_ok.get() | {key}) if allow_nested else None
    try:
        # Who holds the lock, for a person looking at a stuck build.
        (out / ".batchseg.lock.owner").write_text(f"pid {os.getpid()}\n")
        yield
    finally:
        if token is not None:
            _nested_ok.reset(token)
        lock.release()
