"""`batchseg build PIPELINE.yaml`: every stage of a pipeline file, in order, on one cluster.

The driver takes OUT's lock once (the stages take it again, nested), plans each unit
(``build_plan``: up to date units are skipped from file listings alone), starts one
Dask cluster the first time a unit needs workers (or joins the user's scheduler),
hands each stage its own config with that cluster's address, and records the run:
``OUT/runs/RUN_ID.log`` (everything), ``OUT/runs/RUN_ID.json`` (per-unit status,
counts, timings; a copy in ``OUT/last-build.json``) and the stage fingerprints
(``build_state``). Each stage is incremental and idempotent, so a build killed at
any point finishes when run again.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import platform
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import batchseg
from batchseg.cluster import ClusterSettings
from batchseg.errors import BatchsegError, UsageError
from batchseg.io.lock import build_lock
from batchseg.io.files import write_json_atomic
from batchseg.io.runs import RunRecorder, RunStatus, new_run_id, recorded_run
from batchseg.pipeline.schema import STAGES
from batchseg.pipeline.spec import Pipeline
from batchseg.stages.build_plan import StagePlan, plan_unit, stage_fingerprint, stage_keys
from batchseg.stages.build_state import stage_state, store_stage
from batchseg.stages.build_units import run_unit

LAST_BUILD = "last-build.json"


@dataclass(frozen=True)
class BuildOptions:
    """How to run a pipeline: ``--dry-run``, ``--from STAGE``, ``--only STAGE``, progress bars."""

    dry_run: bool = False
    from_stage: str | None = None
    only: str | None = None
    progress: bool = False

    def validate(self, pipeline: Pipeline) -> None:
        if self.from_stage and self.only:
            raise UsageError("give at most one of --from and --only")
        for option, stage in (("--from", self.from_stage), ("--only", self.only)):
            if stage is None:
                continue
            if stage not in STAGES:
                raise UsageError(f"{option} {stage}: unknown stage; stages: {', '.join(STAGES)}")
            if stage not in pipeline.stages():
                raise UsageError(f"{option} {stage}: {pipeline.path} has no {stage} section "
                                 f"(its stages: {', '.join(pipeline.stages())})")

    def selected(self, stage: str) -> bool:
        if self.only:
            return stage == self.only
        if self.from_stage:
            return STAGES.index(stage) >= STAGES.index(self.from_stage)
        return True


@dataclass
class UnitResult:
    """What one unit did in one run (a row of the run record)."""

    key: str
    stage: str
    # "up to date" (skipped from its fingerprint), "ran" (computed something), "nothing new"
    # (ran, found nothing missing), "kept" (a student kept by the retrain policy),
    # "skipped" (qc on too few images), "failed"
    status: str
    computed: int  # images (embed, pseudolabel), files (qc), label parts (export), students trained, ...
    seconds: float
    summary: str  # the one line printed for it
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildSummary:
    run_id: str
    out: Path
    units: tuple[UnitResult, ...]
    seconds: float
    status: str

    def text(self) -> str:
        computed = sum(u.status == "ran" for u in self.units)
        return (f"build {self.status}: {len(self.units)} units, {computed} computed something, "
                f"{sum(u.status == 'up to date' for u in self.units)} up to date; {self.seconds:.1f} s; "
                f"record {self.out / 'runs' / (self.run_id + '.json')}, log runs/{self.run_id}.log")


class SharedCluster:
    """One Dask cluster for the whole build, started the first time a stage needs it."""

    def __init__(self, settings: ClusterSettings, out: Path, stack: ExitStack, log: "RunLog") -> None:
        self._settings, self._out, self._stack, self._log = settings, out, stack, log
        self._shared: ClusterSettings | None = None
        self.started_seconds = 0.0

    def settings(self) -> ClusterSettings:
        """Cluster settings pointing every stage at the one cluster (started on first use)."""
        if self._shared is None:
            from batchseg.cluster import dask_client

            tick = time.perf_counter()
            client = self._stack.enter_context(dask_client(self._settings, self._out))
            own = not self._settings.scheduler and not _env_scheduler()
            threads = self._settings.torch_threads
            if threads is None and own and not self._settings.gpus:
                threads = self._settings.threads_per_worker()  # what a stage's own local cluster would use
            self._shared = dataclasses.replace(self._settings, scheduler=client.scheduler.address,
                                               torch_threads=threads)
            self.started_seconds = time.perf_counter() - tick
            self._log.detail(f"dask: {'started a local cluster' if own else 'joined'} {client.scheduler.address} "
                             f"in {self.started_seconds:.1f} s")
        return self._shared


def _env_scheduler() -> str | None:
    import os

    from batchseg.cluster import SCHEDULER_ENV

    return os.environ.get(SCHEDULER_ENV)


class RunLog:
    """``OUT/runs/RUN_ID.log``: every line of the run, library warnings included; the
    one-line-per-stage summary also goes to ``echo`` (stdout: what cron mails)."""

    def __init__(self, path: Path | None, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.path = path
        self._handler: logging.Handler | None = None
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)
            self._handler = logging.StreamHandler(self._file)
            self._handler.setLevel(logging.WARNING)
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(self._handler)

    def line(self, text: str) -> None:
        self.echo(text)
        self.detail(text)

    def detail(self, text: str) -> None:
        if self._file is not None:
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            for row in text.splitlines() or [""]:
                self._file.write(f"{stamp} {row}\n")

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        if self._file is not None:
            self._file.close()


def dry_run(pipeline: Pipeline, options: BuildOptions, echo: Callable[[str], None] = print) -> list[StagePlan]:
    """Print, per unit, what a run would compute; write nothing."""
    options.validate(pipeline)
    plans: list[StagePlan] = []
    new_images = 0
    echo(f"dry run of {pipeline.path} (output {pipeline.out}); nothing is computed or written")
    for key, stage, config in stage_keys(pipeline):
        if not options.selected(stage):
            continue
        plan = plan_unit(pipeline, key, stage, config, new_images)
        new_images = max(new_images, plan.new_images)
        plans.append(plan)
        echo(f"  {plan.line()}")
    return plans


def run_build(pipeline: Pipeline, options: BuildOptions, echo: Callable[[str], None] = print,
              builders: Any = None) -> BuildSummary:
    """Run the pipeline's stages; returns the summary. ``LockedError`` when OUT is busy,
    ``UsageError`` for bad input found on the way, ``BatchsegError`` when a stage failed."""
    options.validate(pipeline)
    out = pipeline.out
    run_id = new_run_id()
    started = time.perf_counter()
    with build_lock(out, allow_nested=True):
        log = RunLog(out / "runs" / f"{run_id}.log", echo)
        results: list[UnitResult] = []
        config = {"pipeline": str(pipeline.path.resolve()), "options": dataclasses.asdict(options)}
        run: RunRecorder | None = None
        try:
            # The record gets the stage's own exception; it becomes a BatchsegError only below.
            with recorded_run(out, "build", config, run_id=run_id) as run:
                run.set(log=f"runs/{run_id}.log")
                try:
                    log.detail(f"batchseg build {pipeline.path} (run {run_id}, batchseg {batchseg.__version__}, "
                               f"host {platform.node()}); argv: {' '.join(sys.argv)}")
                    with ExitStack() as stack:
                        shared = SharedCluster(pipeline.cluster, out, stack, log)
                        _run_units(pipeline, options, shared, log, results, run_id, builders)
                finally:
                    run.set(stages=[dataclasses.asdict(u) for u in results])
        except BatchsegError as exc:
            log.detail(f"error: {exc}")
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.detail(traceback.format_exc())  # the log and the record; stdout/stderr get one line
            raise BatchsegError(f"build failed in a stage: {error} (details in {log.path})") from exc
        finally:
            status = run.record["status"] if run is not None else RunStatus.FAILED.value
            summary = BuildSummary(run_id, out, tuple(results), time.perf_counter() - started, status)
            if run is not None:
                write_json_atomic(out / LAST_BUILD, run.record, default=str)
            log.detail(summary.text())
            log.close()
    return summary


def _run_units(pipeline: Pipeline, options: BuildOptions, shared: SharedCluster, log: RunLog,
               results: list[UnitResult], run_id: str, builders: Any) -> None:
    for key, stage, config in stage_keys(pipeline):
        if not options.selected(stage):
            continue
        tick = time.perf_counter()
        plan = plan_unit(pipeline, key, stage, config, 0)
        if plan.up_to_date:
            result = UnitResult(key, stage, "up to date", 0, time.perf_counter() - tick, f"{key}: up to date")
        else:
            log.detail(f"{key}: {plan.what}")
            try:
                result = run_unit(pipeline, key, stage, config, plan, shared, log, options.progress, builders)
            except Exception as exc:
                results.append(UnitResult(key, stage, "failed", 0, time.perf_counter() - tick, f"{key}: failed: {exc}"))
                log.line(f"{key}: failed: {exc}")
                raise
            result.seconds = time.perf_counter() - tick
            if key != "embed":
                state = stage_state(pipeline.out, key)
                store_stage(pipeline.out, key, {**state, **result.counts.pop("_state", {}), "run_id": run_id,
                                                "fingerprint": stage_fingerprint(pipeline, key, config)})
        results.append(result)
        log.line(f"{result.summary} ({result.seconds:.1f} s)")
