"""The conductor: runs many compression jobs on one frozen model through the stages, one file each.

    admit ──► prepare ──► teach ──► train (steps) ──► finish
              queries     cache     packed slots      eval, export, report

``Engine.run(jobs)`` admits waiting jobs into free slots; each admission stage (:attr:`Engine.admission`: prepare,
then teach) runs once for the admitted jobs and as many waiting ones, in one continuous batch; the train stage starts
each admitted job in its slot and steps every training job; a job that converges or spends its budget is finished at
once. A failing job is marked FAILED with its reason; the others continue.

Checkpoints (``OUT/checkpoint.safetensors``): every ``checkpoint_every`` steps, before a step's stopped jobs are
exported, and when Ctrl-C or SIGTERM asks the run to stop (at its next safe point, :mod:`fastsoft.signals`). The
conductor keeps the queues; each stage adds its own part (``state_dict``). A job whose folder already holds a
verified export of the same job and settings is kept, by a rerun as by ``--resume``; one whose export went missing
or changed is compressed again.

A new stage is one file with the stage interface (``name``, ``admit(runs) -> {job id: error}``, ``state_dict``,
``load_state_dict``) and one entry in :attr:`Engine.admission`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from fastsoft import signals
from fastsoft.config import CompressConfig
from fastsoft.data.jobs import Job
from fastsoft.data.templates import make_template
from fastsoft.distributed import Dist
from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import remove_leftovers
from fastsoft.io.checkpoint import CHECKPOINT, jobs_digest, load_checkpoint, read_checkpoint, save_checkpoint
from fastsoft.io.lock import FolderLock
from fastsoft.io.outputs import RunFolder, make_folder
from fastsoft.pipeline.context import RunContext
from fastsoft.pipeline.finish import FinishStage
from fastsoft.pipeline.prepare import PrepareStage
from fastsoft.pipeline.teach import TeachStage
from fastsoft.pipeline.train import TrainStage
from fastsoft.teacher.cache import cache_folder
from fastsoft.train.progress import RunProgress
from fastsoft.train.scheduler import JobRun, Scheduler, State, job_seed


class Engine:
    """Compress many jobs on one frozen model (this process's share of them under torchrun).

    ``on_step(runs)``, when given, is called at every training step, after the step is planned and before it
    runs, with the jobs it trains. It is the seam for observing a run; an exception raised there acts as
    one raised inside the step (``KeyboardInterrupt`` checkpoints, ``torch.OutOfMemoryError`` lowers the budget).
    """

    def __init__(
        self,
        loaded,
        config: CompressConfig,
        out_dir: str | Path,
        cache_dir: str | Path | None = None,
        overwrite: bool = False,
        progress: bool = True,
        resume: bool = False,
        checkpoint_every: int = 10,
        rebuild_cache: bool = False,
        dist: Dist | None = None,
        on_step: Callable[[list[JobRun]], None] | None = None,
    ):
        config.validate()
        dist = dist or Dist()
        template = make_template(loaded.tokenizer, config.placement, config.template)
        scheduler = Scheduler(config.slots, config.token_budget)
        self.ctx = RunContext(loaded, config, RunFolder(out_dir), dist, template, scheduler, resume)
        self.overwrite, self.progress, self.checkpoint_every = overwrite, progress, checkpoint_every
        self.loop_steps = 0  # loop iterations, the checkpoint clock
        self.locks: list[FolderLock] = []  # held until run() ends (or close())
        out = self.ctx.out.root
        cache_root = cache_folder(out, cache_dir, dist.rank if dist.active else None)
        try:
            make_folder(out, "--out")
            if dist.rank == 0:  # one run per output folder (every run has a rank 0)
                self.locks.append(FolderLock(out, "output folder").acquire())
            make_folder(cache_root, "--cache")
            self.locks.append(FolderLock(cache_root, "teacher cache folder").acquire())
            for folder in (out, cache_root):  # what writers killed mid-write left behind
                remove_leftovers(folder)
            if resume:  # before the cache is opened, which --rebuild-cache may empty for the new model
                self._check_checkpoint_model()
            self.prepare = PrepareStage(self.ctx)
            self.teach = TeachStage(self.ctx, cache_root, rebuild=rebuild_cache)
        except BaseException:
            self.close()
            raise
        self.train = TrainStage(self.ctx, on_step)
        self.finish = FinishStage(self.ctx, self.teach.spec.kind)
        self.admission = [self.prepare, self.teach]  # in order, for the jobs admitted (and the next in line)
        self.stages = [*self.admission, self.train, self.finish]

    @property
    def scheduler(self) -> Scheduler:
        return self.ctx.scheduler

    def close(self) -> None:
        """Release the folders' locks (``run`` does when it ends; an engine never run can call it)."""
        for lock in self.locks:
            lock.release()
        self.locks = []

    def run(self, jobs: list[Job]) -> list[JobRun]:
        """Compress every job; returns the runs (DONE with ``run.report``, or FAILED with ``run.error``).

        Ctrl-C or SIGTERM only sets a flag (:mod:`fastsoft.signals`): the run stops at its next safe point, checkpoints
        and raises :class:`fastsoft.signals.Interrupted` (a ``KeyboardInterrupt``). The folders' locks are released
        when it returns or raises.
        """
        try:
            with signals.stop_requests(), signals.collective_stops() if self.ctx.dist.split else nullcontext():
                return self._run(jobs)
        finally:
            self.close()

    # -- the loop ----------------------------------------------------------------------------------------------------

    def _run(self, jobs: list[Job]) -> list[JobRun]:
        jobs, dropped = self.prepare.check(jobs)
        cfg = self.ctx.config
        self.jobs_hash = jobs_digest(jobs)
        runs = {job.id: JobRun(job, job_seed(cfg.seed, job.id), dropped=dropped[job.id]) for job in jobs}
        for job in jobs:
            self.finish.origin(job)
        if not (self.ctx.resume and self._restore(runs)):
            for run in runs.values():
                if not self.overwrite and self.finish.on_disk(run):  # a rerun keeps what it verified
                    self.scheduler.finished.append(run)
                else:
                    self.scheduler.submit(run)
        done = sum(cfg.steps if r.state in (State.DONE, State.FAILED) else r.step for r in runs.values())
        progress = RunProgress(len(jobs) * cfg.steps, done, enabled=self.progress)
        try:
            while self.scheduler.busy:
                self._stop_point()
                self._loop_step(progress)
            self._checkpoint()
        except KeyboardInterrupt:
            self._checkpoint()
            raise
        except OSError as error:  # a full disk, a read-only or vanished folder: say so, keep what can be kept
            raise FastsoftError(self._write_failed(error)) from error
        finally:
            progress.close()
        order = {job.id: i for i, job in enumerate(jobs)}
        return sorted(self.scheduler.finished, key=lambda r: order[r.job.id])

    def _loop_step(self, progress: RunProgress) -> None:
        """Admit what fits, run one training step, checkpoint when due (always before an export), finish what stopped."""
        cfg = self.ctx.config
        admitted = self.scheduler.admit()
        if admitted:
            studying = any(cfg.makes_queries(bool(r.job.queries)) for r in admitted)
            progress.say(
                f"{'self-study and teacher' if studying else 'teacher'}: {', '.join(r.job.id for r in admitted)}"
            )
            progress.advance(cfg.steps * len(self._admit(admitted)))
        stepped = self.train.step()
        self.loop_steps += 1
        stopped = [run for run in stepped if run.error or run.stop_reason]
        # before any export: a run killed while exporting resumes from the very step these jobs stopped at
        if stopped or self.loop_steps % self.checkpoint_every == 0:
            self._checkpoint()
        progress.advance(len(stepped))
        for run in stopped:
            if run.error:
                self.ctx.fail(run, FastsoftError(run.error))
            else:
                progress.say(f"eval {run.job.id}")
                progress.advance(cfg.steps - run.step)
                self.finish.finish(run, run.stop_reason, self.train.bank.get(run.slot))
            signals.stop_if_requested()  # between two exports (a resume finishes the others)
        losses = {r.job.id: r.losses[-1] for r in self.scheduler.running if r.losses}
        progress.after_step(self.scheduler.counts(), self.train.scored_per_second, losses)

    def _admit(self, runs: list[JobRun]) -> list[JobRun]:
        """Run the admission stages for the admitted runs and, ahead of time, as many waiting ones (each stage in one
        continuous batch), then start each admitted run in its slot. Returns the admitted runs that failed."""
        ahead = list(self.scheduler.waiting)[: len(runs)]
        errors: dict[str, FastsoftError] = {}
        for stage in self.admission:
            errors |= stage.admit([r for r in runs + ahead if r.job.id not in errors])
        failed = []
        for run in runs:
            try:
                if run.job.id in errors:  # a waiting run meets its error again when it is admitted
                    raise errors[run.job.id]
                self.teach.attach(run)
                self.train.start(run)
            except FastsoftError as error:
                self.ctx.fail(run, error)
                failed.append(run)
        return failed

    def _stop_point(self) -> None:
        """Stop here if a signal asked to (every rank of a split run stops at the same step, so they agree first)."""
        if self.ctx.dist.split:
            asked = torch.tensor([1.0 if signals.requested() else 0.0], device=self.ctx.loaded.device)
            if float(self.ctx.dist.all_reduce_(asked)) > 0:
                raise signals.Interrupted(signals.requested() or signal.SIGTERM)
        signals.stop_if_requested(local=False)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    @property
    def _checkpoint_name(self) -> str:
        return self.ctx.dist.suffix(CHECKPOINT)

    def _check_checkpoint_model(self) -> None:
        """Refuse to resume a checkpoint of another model (its prompts were trained for that model's embeddings)."""
        path = self.ctx.out.root / self._checkpoint_name
        if not path.is_file():
            return
        saved, fingerprint = read_checkpoint(path).get("model"), self.ctx.loaded.fingerprint
        if saved is not None and saved != fingerprint:
            raise FastsoftError(
                f"the checkpoint in {self.ctx.out.root} was trained on another model (fingerprint {saved[:12]}, this "
                f"model {fingerprint[:12]}); resume with the same --model, or choose another --out"
            )

    def _checkpoint(self) -> None:
        s, writes = self.scheduler, self.ctx.writes_reports
        state = {
            "jobs_digest": self.jobs_hash,
            "model": self.ctx.loaded.fingerprint,
            "config": self.ctx.config.to_dict(),
            # a run admitted but not yet taught (Ctrl-C during self-study or the teacher pass) starts again
            "waiting": [r.job.id for r in s.running if r.state is State.TEACHING] + [r.job.id for r in s.waiting],
            "running": {r.job.id: r.state_dict() for r in s.running if r.state is not State.TEACHING},
            "finished": {r.job.id: r.outcome_dict(writes and r.state is State.DONE) for r in s.finished},
            "loop_steps": self.loop_steps,
        }
        for stage in self.stages:
            state.update(stage.state_dict())
        save_checkpoint(self.ctx.out.root, state, self._checkpoint_name)

    def _restore(self, runs: dict[str, JobRun]) -> bool:
        """Continue a checkpointed run: every stage's state, the queues and every job's progress. Returns False when
        there is no checkpoint yet (killed before the first): the run then starts afresh, keeping finished jobs."""
        out = self.ctx.out
        if not (out.root / self._checkpoint_name).is_file() and not any(out.root.glob("checkpoint*.safetensors")):
            RunProgress.note(f"no checkpoint in {out.root} yet: finished jobs are kept, the others start again")
            return False
        state = load_checkpoint(out.root, self.jobs_hash, self.ctx.config.to_dict(), self._checkpoint_name)
        for stage in self.stages:
            stage.load_state_dict(state)
        s = self.scheduler
        s.waiting.extend(runs[i] for i in state["waiting"])  # not started: as built from their seeds
        for job_id, saved in state["finished"].items():
            run = runs[job_id]
            if saved["state"] == State.DONE.value and saved["report"] is None and not self.finish.on_disk(run, True):
                s.waiting.append(run)  # its export went missing or changed: compressed again (job independence)
                continue
            if run.state is not State.DONE:
                run.load_outcome(saved, lambda job_id=job_id: out.read_report(job_id))
            s.finished.append(run)
        self.loop_steps = state["loop_steps"]
        for job_id, saved in state["running"].items():
            run = runs[job_id]
            run.load_state_dict(saved)
            s.running.append(run)
            if run.error:  # it failed in the step before the checkpoint, which came before its error was written
                self.ctx.fail(run, FastsoftError(run.error))
            elif run.stop_reason and self.finish.on_disk(run, True):  # exported after the checkpoint: never redo it
                run.state = State.TRAINING  # retire() moves it from running to finished
                s.retire(run, State.DONE)
            elif not run.stop_reason and out.is_finished(job_id):  # a checkpoint of a version that exported first
                run.report = out.read_report(job_id)
                s.retire(run, State.DONE)
        self._resume_running()
        return True

    def _resume_running(self) -> None:
        """The restored training jobs: prepared and taught again where needed (a rebuilt cache dropped what failed its
        checks), given their teacher, and finished if they had stopped in the checkpointed step."""
        for stage in self.admission:  # a job that cannot be prepared or taught again (nor could it before) fails alone
            for job_id, error in stage.admit(list(self.scheduler.running)).items():
                self.ctx.fail(next(r for r in self.scheduler.running if r.job.id == job_id), error)
        for run in list(self.scheduler.running):
            self.teach.attach(run)  # a damaged shard refuses the resume, naming --rebuild-cache
            if run.stop_reason:  # it stopped in the checkpointed step; its export was not (fully) written
                self.finish.finish(run, run.stop_reason, self.train.bank.get(run.slot))

    def _write_failed(self, error: OSError) -> str:
        """One sentence for a write that failed mid-run, after trying to save a checkpoint to resume from."""
        where = f" writing {error.filename}" if error.filename else ""
        try:
            self._checkpoint()
            advice = "a checkpoint was saved: fix it and run again with --resume"
        except OSError:
            if (self.ctx.out.root / self._checkpoint_name).is_file():
                advice = "fix it and run again with --resume (from the last checkpoint)"
            else:
                advice = "fix it and run the same command again (no checkpoint was written yet; finished jobs are kept)"
        return f"{error.strerror or error}{where}; {advice}"
