"""Dask execution: a local cluster started by the command, or an existing scheduler.

Durable state never lives here (DESIGN rule 1): the cluster only runs idempotent
shard tasks whose results are files. :class:`ClusterSettings` is the one definition of
the cluster options (``--scheduler``/``DASK_SCHEDULER_ADDRESS``, ``--workers``,
``--gpus``, ``--threads``) that the CLI and pipeline files share. Import-light:
Dask is imported only when a cluster is started.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from batchseg.errors import UsageError

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
MAX_LOCAL_PROCESSES = 1024  # far past any real machine, low enough that a typo cannot exhaust one
# Option (and pipeline-file key) name -> ClusterSettings field.
OPTION_FIELDS = {"scheduler": "scheduler", "workers": "workers", "gpus": "gpus", "threads": "torch_threads"}


@dataclass(frozen=True)
class ClusterSettings:
    """Where the work runs: an existing scheduler, or a local cluster the command starts."""

    scheduler: str | None = None  # address of an existing Dask scheduler
    workers: int = 1  # CPU worker processes of the local cluster
    gpus: int = 0  # one worker per GPU when > 0
    torch_threads: int | None = None  # per worker; None: cores / workers

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ClusterSettings:
        """From option names (``scheduler``, ``workers``, ``gpus``, ``threads``); absent ones keep their default."""
        return cls(**{OPTION_FIELDS[name]: value for name, value in options.items()})

    def validate(self) -> None:
        if not 1 <= self.workers <= MAX_LOCAL_PROCESSES:
            raise UsageError(f"--workers must be between 1 and {MAX_LOCAL_PROCESSES}, got {self.workers}")
        if not 0 <= self.gpus <= MAX_LOCAL_PROCESSES:
            raise UsageError(f"--gpus must be between 0 and {MAX_LOCAL_PROCESSES}, got {self.gpus}")
        if self.torch_threads is not None and not 1 <= self.torch_threads <= MAX_LOCAL_PROCESSES:
            raise UsageError(f"--threads must be between 1 and {MAX_LOCAL_PROCESSES}, got {self.torch_threads}")

    def threads_per_worker(self) -> int:
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.gpus or self.workers))


# The scheduler always serves HTTP (health and metrics routes, the dashboard when bokeh is
# installed); None means its default port 8787, which a second cluster on the machine
# finds taken ("Port 8787 is already in use"). Port 0: any free port.
_HTTP_ADDRESS = ":0"


def _thread_env(threads: int) -> dict[str, str]:
    # Each worker runs one task at a time and gives the model all its cores; capping
    # the BLAS pools keeps N workers from oversubscribing the machine N-fold.
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def _gpu_cluster(gpus: int, threads: int, local_directory: str):
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu-{index}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "env": {**_thread_env(threads), "CUDA_VISIBLE_DEVICES": str(index)},
                "resources": {"GPU": 1},
                "local_directory": local_directory,
            },
        }
        for index in range(gpus)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": _HTTP_ADDRESS}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.CRITICAL)


def _cpu_cluster(workers: int, threads: int, local_directory: str):
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=_HTTP_ADDRESS,
        local_directory=local_directory,
        silence_logs=logging.CRITICAL,
        env=_thread_env(threads),
    )


@contextmanager
def dask_client(settings: ClusterSettings, build: Path) -> Iterator["distributed.Client"]:  # noqa: F821
    """Yield a connected ``distributed.Client``; close whatever this call started.

    ``settings.scheduler`` (or ``DASK_SCHEDULER_ADDRESS``) joins an existing cluster;
    otherwise a local one is started. Its scratch space goes to the system's temporary
    folder, never inside ``build`` (the output folder): a killed run cannot leave Dask
    folders among the build's files.
    """
    from distributed import Client

    # distributed sets its loggers to INFO when imported; its connection chatter
    # would bury the progress bar. Warnings and errors still show.
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    address = settings.scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return

    scratch = tempfile.mkdtemp(prefix=f"batchseg-dask-{build.name}-")
    threads = settings.threads_per_worker()
    cluster = None
    try:
        if settings.gpus > 0:
            cluster = _gpu_cluster(settings.gpus, threads, scratch)
        else:
            cluster = _cpu_cluster(settings.workers, threads, scratch)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(scratch, ignore_errors=True)


def gpu_resources(settings: ClusterSettings) -> dict[str, float] | None:
    """Task resources: a GPU each when the local cluster has GPU workers."""
    return {"GPU": 1} if settings.gpus > 0 and not settings.scheduler else None


def gather_with_progress(futures: list, total: int, desc: str, progress: bool, advance) -> list:
    """Results of ``futures`` as they complete, with a tqdm bar over ``total`` items.

    ``advance(result)`` says how many items a result covers. A task that failed after
    Dask's retries cancels the rest; its ``BatchsegError`` (a user mistake found on a
    worker, e.g. a bad checkpoint) is re-raised as is, anything else is wrapped.
    """
    from distributed import as_completed
    from tqdm import tqdm

    from batchseg.errors import BatchsegError

    results = []
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:
                for other in futures:
                    other.cancel()
                if isinstance(exc, BatchsegError):
                    raise
                raise BatchsegError(f"task {future.key} failed: {type(exc).__name__}: {exc}") from exc
            results.append(result)
            bar.update(advance(result))
    return results
