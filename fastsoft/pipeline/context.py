"""What every stage of a run shares: the frozen model, the settings, the output folder and the job queues."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastsoft.config import CompressConfig
from fastsoft.data.templates import Template
from fastsoft.distributed import Dist
from fastsoft.io.outputs import RunFolder
from fastsoft.train.objectives import parse_objective
from fastsoft.train.scheduler import JobRun, Scheduler, State


@dataclass
class RunContext:
    """The run's shared objects. A stage reads them and changes a job's queue only through :meth:`fail` (or the
    scheduler's ``retire``); its own state it keeps itself (``state_dict`` / ``load_state_dict``)."""

    loaded: object  # fastsoft.frozen.loading.LoadedModel
    config: CompressConfig
    out: RunFolder
    dist: Dist
    template: Template
    scheduler: Scheduler
    resume: bool = False

    @property
    def objective(self) -> dict[str, float]:
        return parse_objective(self.config.objective)

    @property
    def writes_reports(self) -> bool:
        """Whether this rank evaluates and exports finished jobs (in a split run only rank 0 does)."""
        return not (self.dist.split and self.dist.rank != 0)

    def fail(self, run: JobRun, error: Exception) -> None:
        """The job failed: ``error.json`` first (a run interrupted here fails it again on ``--resume``), then it leaves."""
        run.error = str(error)
        self.out.write_error(run.job.id, run.error)
        self.scheduler.retire(run, State.FAILED)


def charge(stage: str, runs: list[JobRun], started: float) -> None:
    """Share the seconds since ``started`` equally among ``runs`` (they shared one batch of ``stage``)."""
    share = (time.perf_counter() - started) / max(1, len(runs))
    for run in runs:
        run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + share
