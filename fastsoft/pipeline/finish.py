"""Stage 4, finish: a job that stopped is evaluated on its held-out queries, exported (PEFT adapter, ``fastsoft.json``)
and reported (``report.json`` last, with its export's digests and the job's origin); one already finished on disk is
verified and kept.

State: none in the checkpoint; a finished job is its folder in OUT.
"""

from __future__ import annotations

import hashlib
import json

import torch

from fastsoft.data.jobs import Job
from fastsoft.errors import FastsoftError
from fastsoft.eval.evaluate import evaluate
from fastsoft.io.checkpoint import NON_SEMANTIC
from fastsoft.io.report import finished_problem
from fastsoft.pipeline.context import RunContext
from fastsoft.train.progress import RunProgress
from fastsoft.train.scheduler import JobRun, State


class FinishStage:
    name = "finish"

    def __init__(self, ctx: RunContext, teacher_kind: str):
        self.ctx, self.teacher_kind = ctx, teacher_kind
        self.origins: dict[str, dict] = {}

    def origin(self, job: Job) -> dict:
        """What a finished export must have been made from to be kept: the job as given, and the settings that change
        results (on this model). Remembered for the job's report."""
        settings = {k: v for k, v in self.ctx.config.to_dict().items() if k not in NON_SEMANTIC}
        text = json.dumps({"settings": settings, "model": self.ctx.loaded.fingerprint}, sort_keys=True)
        self.origins[job.id] = {"job": job.digest(), "settings": hashlib.sha256(text.encode()).hexdigest()[:32]}
        return self.origins[job.id]

    def on_disk(self, run: JobRun, checkpointed: bool = False) -> bool:
        """Whether the job's folder holds its verified export (then the run is DONE with that report). A folder with an
        export made from another job or other settings is refused; one whose export went missing or changed is not
        finished (a line says so), and the job is compressed again. ``checkpointed``: the checkpoint (same jobs and
        settings) says it finished, so a report of an older fastsoft, which recorded no digests, is trusted."""
        out = self.ctx.out
        folder = out.job(run.job.id)
        if not (folder / "report.json").exists():
            return False
        problem = finished_problem(folder, None if checkpointed else self.origins[run.job.id])
        if problem is not None and checkpointed and "older fastsoft" in problem:
            problem = None
        if problem is None:
            run.report, run.state = out.read_report(run.job.id), State.DONE
            run.step = len(run.report.get("losses", []))
            return True
        if not (problem.endswith("missing") or problem.endswith("changed since it was exported")):
            raise FastsoftError(
                f"{folder} already holds a finished job {run.job.id!r}, but {problem}; pass --overwrite to replace "
                "it, or choose another --out"
            )
        RunProgress.note(f"job {run.job.id!r}: {problem} in {folder}; compressing it again")
        return False

    def finish(self, run: JobRun, reason: str, prompt: torch.Tensor) -> None:
        """Evaluate, export and report the job that stopped for ``reason`` with soft prompt ``prompt [P, H]``."""
        ctx = self.ctx
        run.stop_reason = reason
        if not ctx.writes_reports:  # every rank holds the same σ; rank 0 evaluates and exports it
            run.report = {"job_id": run.job.id, "steps": run.step, "stop_reason": reason, "losses": run.losses}
            ctx.scheduler.retire(run, State.DONE)
            return
        if not bool(torch.isfinite(prompt).all()):  # never exported: a NaN prompt answers nothing
            error = f"the soft prompt of job {run.job.id!r} became NaN or infinite at step {run.step}"
            ctx.fail(run, FastsoftError(error))
            return
        run.report = self._report(run, reason, prompt)
        try:
            ctx.out.write_done(
                run.job.id,
                prompt,
                run.report,
                model_path=ctx.loaded.path,
                model_fingerprint=ctx.loaded.fingerprint,
                template=ctx.template,
                extra={"job_id": run.job.id, "config": ctx.config.to_dict()},
            )
        except FastsoftError as error:  # the export refused it (a non-finite prompt): the job failed, nothing exported
            ctx.fail(run, error)
            return
        ctx.scheduler.retire(run, State.DONE)

    def _report(self, run: JobRun, reason: str, prompt: torch.Tensor) -> dict:
        cfg = self.ctx.config
        metrics = evaluate(
            self.ctx.loaded,
            prompt,
            run.teacher.eval,
            len(run.teacher.context_ids),
            max_new_tokens=cfg.max_new_tokens,
            share_prefix=cfg.share_prefix,
        )
        return {
            "job_id": run.job.id,
            **metrics,
            "steps": run.step,
            "stop_reason": reason,
            "seconds": run.seconds,
            "final_loss": run.losses[-1] if run.losses else None,
            "context_tokens": len(run.teacher.context_ids),
            "prompt_length": cfg.prompt_length,
            "objective": self.ctx.objective,
            "teacher": self.teacher_kind,
            "eval_source": run.eval_source,
            "stage_seconds": {**run.stage_seconds, "training": run.seconds},
            "queries": {"train": len(run.job.queries), "eval": len(run.job.eval_queries)},
            **({"synthesis": run.synthesis} if run.synthesis else {}),
            "losses": run.losses,
            "dropped_queries": run.dropped,
            "origin": self.origins[run.job.id],
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
