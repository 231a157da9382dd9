"""The engine: the loop that schedules jobs through the pipeline's stages.

``Engine.run(jobs)`` drives the scheduler: admit waiting jobs into free slots, let the model write their synthetic
queries (self-study, ``fastsoft/teacher/synthesis.py``), have the teacher stage fill the cache for them
(``fastsoft/teacher/stage.py``), put each admitted job's initial prompt in its slot, pack the training jobs'
minibatches into one step (``fastsoft/train/objectives.py`` computes its losses), update only the slots present, and
finish a job (evaluate, export, report) as soon as it converges or spends its step budget. A failing job is marked
FAILED with its reason; the others continue. Every ``checkpoint_every`` steps, before any job's export, and on Ctrl-C
or SIGTERM (at the next safe point, :mod:`fastsoft.signals`), the run is checkpointed.

A job whose folder already holds a verified export of the same job and settings (``report.json``'s digests,
:func:`fastsoft.io.report.finished_problem`) is kept, not redone, by a rerun as by ``--resume``; one whose export
went missing or changed is compressed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fastsoft import signals
from fastsoft.config import CompressConfig
from fastsoft.data.jobs import Job, deduplication_note
from fastsoft.data.templates import make_template
from fastsoft.distributed import Dist
from fastsoft.errors import FastsoftError
from fastsoft.eval.evaluate import evaluate
from fastsoft.io.atomic import remove_leftovers
from fastsoft.io.checkpoint import (
    CHECKPOINT,
    NON_SEMANTIC,
    jobs_digest,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from fastsoft.io.lock import FolderLock
from fastsoft.io.outputs import RunFolder, cache_folder, make_folder
from fastsoft.io.report import finished_problem
from fastsoft.teacher import synthesis as selfstudy
from fastsoft.teacher.cache import TeacherCache
from fastsoft.teacher.stage import teach_into_cache
from fastsoft.teacher.targets import CacheSpec
from fastsoft.teacher.topics import TOPICS_VERSION, topic_queries
from fastsoft.train.bank import PromptBank
from fastsoft.train.lr_schedule import lr_at
from fastsoft.train.objectives import divergence_of, job_loss_sums, parse_objective, tokens_per_job
from fastsoft.train.packing import Segment
from fastsoft.train.progress import RunProgress
from fastsoft.train.prompt_init import init_prompt
from fastsoft.train.scheduler import JobRun, Scheduler, State, job_seed
from fastsoft.train.stopping import plateau_window, plateaued


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
        self.dist = dist or Dist()
        self.loaded, self.config, self.out = loaded, config, RunFolder(out_dir)
        self.overwrite, self.progress, self.resume = overwrite, progress, resume
        self.checkpoint_every, self.on_step = checkpoint_every, on_step
        self.template = make_template(loaded.tokenizer, config.placement, config.template)
        self.objective = parse_objective(config.objective)
        self.needs_teacher = any(divergence_of(name) is not None for name in self.objective)  # kl, rkl or jsd
        self.spec = CacheSpec(config.teacher, config.top_k, config.samples, config.temperature, config.cache_dtype)
        answers = "greedy" if "answer" in self.objective else "given-else-greedy"
        self.synthesis = selfstudy.SynthesisSettings(config.synthesis_temperature, config.synthesis_top_p)
        params = {**self.spec.params(), "answers": answers, "max_new_tokens": config.max_new_tokens}
        if config.synthesize != 0:  # synthetic queries are written with these settings (counts: in each job's digest)
            params["synthesis"] = self.synthesis.fingerprint()
        fingerprint = {
            "model": loaded.fingerprint,
            "vocab_size": loaded.vocab_size,
            "template": self.template.fingerprint,
            "kind": self.spec.kind,
            "params": params,
        }
        cache_root = cache_folder(self.out.root, cache_dir, self.dist.rank if self.dist.active else None)
        self.locks: list[FolderLock] = []  # held until run() ends (or close())
        try:
            make_folder(self.out.root, "--out")
            if self.dist.rank == 0:  # one run per output folder (every run has a rank 0)
                self.locks.append(FolderLock(self.out.root, "output folder").acquire())
            make_folder(cache_root, "--cache")
            self.locks.append(FolderLock(cache_root, "teacher cache folder").acquire())
            for folder in (self.out.root, cache_root):  # what writers killed mid-write left behind
                remove_leftovers(folder)
            if resume:  # before the cache is opened, which --rebuild-cache may empty for the new model
                self._check_checkpoint_model()
            self.cache = TeacherCache(cache_root, fingerprint, self.spec.target_type, rebuild=rebuild_cache)
        except BaseException:
            self.close()
            raise
        self.bank = PromptBank(config.slots, config.prompt_length, loaded.hidden_size, device=loaded.device)
        self.scheduler = Scheduler(config.slots, config.token_budget)
        # the progress bar's rate over this process's steps: scored tokens of its jobs (split: of all ranks, all-reduced)
        self.scored_tokens, self.train_seconds = 0, 0.0
        self.loop_steps = 0  # loop iterations, the checkpoint clock
        self.oom_retries = 0
        self.unprepared: dict[str, FastsoftError] = {}  # jobs whose queries could not be prepared, and why

    def _check_checkpoint_model(self) -> None:
        """Refuse to resume a checkpoint of another model (its prompts were trained for that model's embeddings)."""
        path = self.out.root / self.dist.suffix(CHECKPOINT)
        if not path.is_file():
            return
        saved = read_checkpoint(path).get("model")
        if saved is not None and saved != self.loaded.fingerprint:
            raise FastsoftError(
                f"the checkpoint in {self.out.root} was trained on another model (fingerprint {saved[:12]}, this "
                f"model {self.loaded.fingerprint[:12]}); resume with the same --model, or choose another --out"
            )

    def close(self) -> None:
        """Release the folders' locks (``run`` does when it ends; an engine never run can call it)."""
        for lock in self.locks:
            lock.release()
        self.locks = []

    # -- job life cycle ---------------------------------------------------------------------------

    @property
    def _writes_reports(self) -> bool:
        """Whether this rank evaluates and exports finished jobs (in a split run only rank 0 does)."""
        return not (self.dist.split and self.dist.rank != 0)

    def _check_jobs(self, jobs: list[Job]) -> list[Job]:
        """The jobs checked, each without repeated queries or training queries that are also held out (one line says
        what was dropped; ``self.dropped`` keeps it for the reports)."""
        duplicates = sorted(i for i, n in Counter(job.id for job in jobs).items() if n > 1)
        if duplicates:
            raise FastsoftError(f"job ids must be unique; repeated: {', '.join(duplicates)}")
        cleaned, self.dropped = [], {}
        for job in jobs:
            job.validate()
            job, counts = job.deduplicated()
            if any(counts.values()):
                self.dropped[job.id] = counts
                if self.dist.rank == 0:
                    RunProgress.note(deduplication_note(job.id, counts))
            if not job.queries and not self.config.makes_queries(False):
                raise FastsoftError(f"job {job.id!r} has no queries{_left(counts)}: give some, or let fastsoft make "
                                    "them (--synthesize N or --topic-queries N, N > 0)")  # fmt: skip
            if "supervised" in self.objective and job.answers is None:
                raise FastsoftError(f"job {job.id!r} has no answers, which the supervised objective needs")
            cleaned.append(job)
        return cleaned

    def _origin(self, job: Job) -> dict:
        """What a finished export must have been made from to be kept: the job as given, and the settings that change
        results (on this model)."""
        settings = {k: v for k, v in self.config.to_dict().items() if k not in NON_SEMANTIC}
        text = json.dumps({"settings": settings, "model": self.loaded.fingerprint}, sort_keys=True)
        return {"job": job.digest(), "settings": hashlib.sha256(text.encode()).hexdigest()[:32]}

    def _finished_on_disk(self, run: JobRun, checkpointed: bool = False) -> bool:
        """Whether the job's folder holds its verified export (then the run is DONE with that report). A folder with an
        export made from another job or other settings is refused; one whose export went missing or changed is not
        finished (a line says so), and the job is compressed again. ``checkpointed``: the checkpoint (same jobs and
        settings) says it finished, so a report of an older fastsoft, which recorded no digests, is trusted."""
        folder = self.out.job(run.job.id)
        if not (folder / "report.json").exists():
            return False
        problem = finished_problem(folder, None if checkpointed else self.origins[run.job.id])
        if problem is not None and checkpointed and "older fastsoft" in problem:
            problem = None
        if problem is None:
            run.report, run.state = self.out.read_report(run.job.id), State.DONE
            run.step = len(run.report.get("losses", []))
            return True
        if not (problem.endswith("missing") or problem.endswith("changed since it was exported")):
            raise FastsoftError(
                f"{folder} already holds a finished job {run.job.id!r}, but {problem}; pass --overwrite to replace "
                "it, or choose another --out"
            )
        RunProgress.note(f"job {run.job.id!r}: {problem} in {folder}; compressing it again")
        return False

    def _prepare(self, runs: list[JobRun]) -> dict[str, FastsoftError]:
        """Give each run not yet prepared its final queries: the synthetic ones (written in one continuous batch for
        all of them, or read back on ``--resume``) and the held-out split. Returns ``{job id: error}``."""
        errors = {r.job.id: self.unprepared[r.job.id] for r in runs if r.job.id in self.unprepared}
        todo = [r for r in runs if not r.eval_source and r.job.id not in errors]
        cfg, written = self.config, {}
        counts = {r.job.id: cfg.synthetic_queries(bool(r.job.queries)) for r in todo}
        topics = {r.job.id: cfg.topic_query_count(bool(r.job.queries)) for r in todo}
        studying = [r for r in todo if counts[r.job.id] or topics[r.job.id]]
        if studying:
            stamps = {r.job.id: self._synthesis_stamp(r, counts[r.job.id], topics[r.job.id]) for r in studying}
            if self.resume:
                written = {r.job.id: selfstudy.load(self.out.job(r.job.id), stamps[r.job.id]) for r in studying}
                written = {k: v for k, v in written.items() if v is not None}
            missing = [(r.job, r.seed, counts[r.job.id]) for r in studying if r.job.id not in written]
            if missing:
                started = time.perf_counter()
                written.update(selfstudy.synthesize(self.loaded, self.template, missing, self.synthesis, topics=topics))
                self._charge("synthesis", [r for r in studying if r.job.id in {j.id for j, _, _ in missing}], started)
        for run in todo:
            synthesis = written.get(run.job.id)
            if isinstance(synthesis, FastsoftError):
                errors[run.job.id] = synthesis
                continue
            job, source = selfstudy.expand(run.job, synthesis, cfg.eval_fraction, cfg.seed)
            if not job.queries:
                dropped = ", ".join(f"{n} {why}" for why, n in synthesis.dropped.items() if n) if synthesis else ""
                errors[run.job.id] = FastsoftError(
                    f"job {run.job.id!r} has no training queries: of the {counts[run.job.id]} the model wrote and the "
                    f"{len(topic_queries(run.job.context, topics[run.job.id]))} topic queries its context gave, none "
                    f"was kept ({dropped or 'none made'}); give queries, or raise --synthesize or --topic-queries"
                )
                continue
            if synthesis is not None:
                run.synthesis = {"kept": len(synthesis.kept), "dropped": synthesis.dropped}
                if self._writes_reports:
                    selfstudy.save(self.out.job(job.id), synthesis, job.eval_queries, stamps[job.id])
            run.job, run.eval_source = job, source
        self.unprepared.update(errors)  # a waiting run prepared ahead meets its error when it is admitted
        return errors

    @staticmethod
    def _charge(stage: str, runs: list[JobRun], started: float) -> None:
        """Share the seconds since ``started`` equally among ``runs`` (they shared one batch of ``stage``)."""
        share = (time.perf_counter() - started) / max(1, len(runs))
        for run in runs:
            run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + share

    def _synthesis_stamp(self, run: JobRun, count: int, topics: int) -> dict:
        """What a saved synthesis must match to be reused on ``--resume``."""
        return {
            "settings": self.synthesis.fingerprint(),
            "count": count,
            "topics": topics,
            "topics_version": TOPICS_VERSION,
            "seed": run.seed,
            "job": run.job.digest(),
            "model": self.loaded.fingerprint,
            "template": self.template.fingerprint,
        }

    def _admit(self, runs: list[JobRun]) -> list[JobRun]:
        """Write the synthetic queries of the admitted runs (and, ahead of time, as many waiting ones) and teach them, each
        stage in one continuous batch, then put each admitted run's initial prompt in its slot. Returns the admitted runs
        that failed."""
        cfg = self.config
        ahead = list(self.scheduler.waiting)[: len(runs)]
        errors = self._prepare(runs + ahead)
        ready = [r for r in runs + ahead if r.job.id not in errors]
        started = time.perf_counter()
        errors |= teach_into_cache(
            self.loaded,
            self.template,
            self.cache,
            self.spec,
            [(r.job, r.seed) for r in ready],
            max_new_tokens=cfg.max_new_tokens,
            use_answers="answer" not in self.objective,
        )
        self._charge("teacher", ready, started)
        failed = []
        for run in runs:
            job = run.job
            try:
                if job.id in errors:  # a waiting run meets its error again when it is admitted
                    raise errors[job.id]
                run.teacher = self.cache.get(job.id, job.digest())
                context_length = len(run.teacher.context_ids)
                if cfg.prompt_length > context_length:
                    raise FastsoftError(
                        f"prompt length {cfg.prompt_length} is larger than the context of job {job.id!r} ({context_length} "
                        "tokens); pass a shorter --prompt-length (prompt_length=)"
                    )
                prompt = init_prompt(
                    self.loaded, run.teacher.context_ids, cfg.prompt_length, cfg.init, run.generator, cfg.init_text
                )
                self.bank.assign(run.slot, prompt)
                run.state = State.TRAINING
            except FastsoftError as error:
                self._fail(run, error)
                failed.append(run)
        return failed

    def _finish(self, run: JobRun, reason: str) -> None:
        run.stop_reason = reason
        if not self._writes_reports:  # every rank holds the same σ; rank 0 evaluates and exports it
            run.report = {"job_id": run.job.id, "steps": run.step, "stop_reason": reason, "losses": run.losses}
            self.scheduler.retire(run, State.DONE)
            return
        prompt = self.bank.get(run.slot)
        if not bool(torch.isfinite(prompt).all()):  # never exported: a NaN prompt answers nothing
            self._fail(
                run, FastsoftError(f"the soft prompt of job {run.job.id!r} became NaN or infinite at step {run.step}")
            )
            return
        cfg = self.config
        metrics = evaluate(
            self.loaded,
            prompt,
            run.teacher.eval,
            len(run.teacher.context_ids),
            max_new_tokens=cfg.max_new_tokens,
            share_prefix=cfg.share_prefix,
        )
        run.report = {
            "job_id": run.job.id,
            **metrics,
            "steps": run.step,
            "stop_reason": reason,
            "seconds": run.seconds,
            "final_loss": run.losses[-1] if run.losses else None,
            "context_tokens": len(run.teacher.context_ids),
            "prompt_length": self.config.prompt_length,
            "objective": self.objective,
            "teacher": self.spec.kind,
            "eval_source": run.eval_source,
            "stage_seconds": {**run.stage_seconds, "training": run.seconds},
            "queries": {"train": len(run.job.queries), "eval": len(run.job.eval_queries)},
            **({"synthesis": run.synthesis} if run.synthesis else {}),
            "losses": run.losses,
            "dropped_queries": self.dropped.get(run.job.id, dict.fromkeys(DROPPED_COUNTS, 0)),
            "origin": self.origins[run.job.id],
        }
        try:
            self.out.write_done(
                run.job.id,
                prompt,
                run.report,
                model_path=self.loaded.path,
                model_fingerprint=self.loaded.fingerprint,
                template=self.template,
                extra={"job_id": run.job.id, "config": self.config.to_dict()},
            )
        except FastsoftError as error:  # the export refused it (a non-finite prompt): the job failed, nothing exported
            self._fail(run, error)
            return
        self.scheduler.retire(run, State.DONE)

    def _fail(self, run: JobRun, error: Exception) -> None:
        run.error = str(error)
        self.out.write_error(run.job.id, run.error)  # first: a run interrupted here is failed again on --resume
        self.scheduler.retire(run, State.FAILED)

    # -- one training step ----------------------------------------------------------------------

    def _segments(self, run: JobRun, queries: list[int]) -> list[Segment]:
        return [
            Segment(run.slot, run.teacher.train[q].before, run.teacher.train[q].after, run.teacher.train[q].answer)
            for q in queries
        ]

    def _share(self, queries: list[int]) -> list[int]:
        """This rank's part of a minibatch (all of it unless jobs are split across ranks)."""
        return queries[self.dist.rank :: self.dist.world] if self.dist.split else queries

    def _step(self) -> list[JobRun]:
        """One optimizer step over the training jobs that fit the token budget; returns them, each with its stop
        decision made (``stop_reason`` or ``error`` set when it stops here).

        Before the commit at the end nothing a checkpoint keeps changes but the minibatches drawn (kept until they
        run), so an interrupt or an out-of-memory retry in the forward or backward replans the very same step.
        """
        cfg, P = self.config, self.config.prompt_length
        training = [r for r in self.scheduler.running if r.state is State.TRAINING]
        for run in training:  # signals only set a flag (fastsoft.signals): a draw and the commit below are never cut
            if not run.pending:
                run.pending = run.next_batch(cfg.batch_queries)
        lengths = {r.slot: [s.length(P) for s in self._segments(r, r.pending)] for r in training}
        chosen = self.scheduler.plan({r.slot: r.pending for r in training}, lengths)
        if not chosen:
            return []
        if self.on_step is not None:
            self.on_step(chosen)
        started = time.perf_counter()
        segments, job_of_segment, parts = [], [], []
        for index, run in enumerate(chosen):
            mine = self._share(run.pending)
            segments += self._segments(run, mine)
            job_of_segment += [index] * len(mine)
            offsets = run.teacher.row_offsets
            parts += [run.teacher.targets[offsets[q] : offsets[q + 1]] for q in mine]
        counts = tokens_per_job(segments, job_of_segment, len(chosen)).to(self.loaded.device)
        counts = self.dist.all_reduce_(counts) if self.dist.split else counts
        sums = torch.zeros(len(chosen), device=self.loaded.device)  # per-job summed token losses on this rank
        if segments:
            teacher = type(parts[0]).concat(parts) if self.needs_teacher else None
            sums = job_loss_sums(
                self.loaded,
                self.bank.prompts,
                segments,
                job_of_segment,
                len(chosen),
                teacher,
                self.objective,
                temperature=cfg.temperature,
                backend=cfg.backend,
                grad_filter=cfg.grad_filter,
                share_prefix=cfg.share_prefix,
            )
            # each slot's gradient comes from its own job's mean loss only (normalised by the job's global count)
            (sums / counts.clamp_min(1)).sum().backward()
        if self.dist.split:
            grad = self.bank.prompts.grad if self.bank.prompts.grad is not None else torch.zeros_like(self.bank.prompts)
            self.bank.prompts.grad = self.dist.all_reduce_(grad)
            sums = self.dist.all_reduce_(sums.detach())
        losses = (sums.detach() / counts.clamp_min(1)).cpu().tolist()
        elapsed = time.perf_counter() - started
        # the commit: what a checkpoint keeps changes from here on, all of it (no signal interrupts it)
        self.bank.step({run.slot: lr_at(run.step, cfg.steps, cfg.lr, cfg.warmup) for run in chosen})
        self.scheduler.commit(chosen)
        self.scored_tokens += int(counts.sum())
        self.train_seconds += elapsed
        for run, loss in zip(chosen, losses):
            run.step += 1
            run.losses.append(loss)
            run.seconds += elapsed
            run.pending = None
            try:
                run.stop_reason = self._stop_reason(run) or ""
            except FastsoftError as error:
                run.error = str(error)
        return chosen

    def _train_step(self) -> list[JobRun]:
        """:meth:`_step`, lowering the token budget and retrying when the device runs out of memory."""
        while True:
            try:
                return self._step()
            except torch.OutOfMemoryError:
                self.bank.prompts.grad = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                budget = self.scheduler.token_budget
                if budget <= 1:
                    raise FastsoftError(
                        "out of device memory even for a single job's minibatch; lower --batch-queries"
                    ) from None
                self.scheduler.token_budget = max(1, budget // 2)
                self.oom_retries += 1
                RunProgress.note(
                    f"out of memory in a step; token budget lowered from {budget} to {self.scheduler.token_budget}, retrying"
                )

    def _stop_reason(self, run: JobRun) -> str | None:
        cfg = self.config
        if not all(math.isfinite(x) for x in run.losses[-1:]):
            raise FastsoftError(f"the loss of job {run.job.id!r} became {run.losses[-1]} at step {run.step}")
        recent = run.losses[-cfg.patience :]
        if len(recent) == cfg.patience and sum(recent) / len(recent) < cfg.tol:
            return "converged"
        if plateaued(run.losses, plateau_window(len(run.teacher.train), cfg.batch_queries), cfg.min_improvement):
            return "plateau"
        if run.step >= cfg.steps:
            return "step budget"
        return None

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        s = self.scheduler
        save_checkpoint(
            self.out.root,
            {
                "jobs_digest": self.jobs_hash,
                "model": self.loaded.fingerprint,
                "config": self.config.to_dict(),
                "bank": self.bank.state_dict(),
                # a run admitted but not yet taught (Ctrl-C during self-study or the teacher pass) starts again
                "waiting": [r.job.id for r in s.running if r.state is State.TEACHING] + [r.job.id for r in s.waiting],
                "running": {r.job.id: r.state_dict() for r in s.running if r.state is not State.TEACHING},
                "finished": {
                    r.job.id: r.outcome_dict(self._writes_reports and r.state is State.DONE) for r in s.finished
                },
                "token_budget": s.token_budget,
                "loop_steps": self.loop_steps,
                "torch_rng": torch.get_rng_state(),
            },
            self.dist.suffix(CHECKPOINT),
        )

    def _restore(self, runs: dict[str, JobRun]) -> bool:
        """Continue a checkpointed run: slots, optimizer state, queues and every job's progress. Returns False when
        there is no checkpoint yet (killed before the first): the run then starts afresh, keeping finished jobs."""
        name = self.dist.suffix(CHECKPOINT)
        if not (self.out.root / name).is_file() and not any(self.out.root.glob("checkpoint*.safetensors")):
            RunProgress.note(f"no checkpoint in {self.out.root} yet: finished jobs are kept, the others start again")
            return False
        state = load_checkpoint(self.out.root, self.jobs_hash, self.config.to_dict(), name)
        self.bank.load_state_dict(state["bank"])
        s = self.scheduler
        s.waiting.extend(runs[i] for i in state["waiting"])  # not started: as built from their seeds
        for job_id, saved in state["finished"].items():
            run = runs[job_id]
            if saved["state"] == State.DONE.value and saved["report"] is None and not self._finished_on_disk(run, True):
                s.waiting.append(run)  # its export went missing or changed: compressed again (job independence)
                continue
            if run.state is not State.DONE:
                run.load_outcome(saved, lambda job_id=job_id: self.out.read_report(job_id))
            s.finished.append(run)
        s.token_budget = state["token_budget"]
        self.loop_steps = state["loop_steps"]
        torch.set_rng_state(state["torch_rng"])
        for job_id, saved in state["running"].items():
            run = runs[job_id]
            run.load_state_dict(saved)
            s.running.append(run)
            if run.error:  # it failed in the step before the checkpoint, which came before its error was written
                self._fail(run, FastsoftError(run.error))
            elif run.stop_reason and self._finished_on_disk(run, True):  # exported after the checkpoint: never redo it
                run.state = State.TRAINING  # retire() below moves it from running to finished
                s.retire(run, State.DONE)
            elif not run.stop_reason and self.out.is_finished(job_id):  # a checkpoint of a version that exported first
                run.report = self.out.read_report(job_id)
                s.retire(run, State.DONE)
        # a rebuilt cache (--rebuild-cache) dropped what failed its checks: teach those jobs again
        cfg = self.config
        for job_id, error in self._prepare(list(s.running)).items():
            self._fail(runs[job_id], error)
        missing = [(r.job, r.seed) for r in s.running if not self.cache.has(r.job.id, r.job.digest())]
        errors = teach_into_cache(self.loaded, self.template, self.cache, self.spec, missing,
                                  max_new_tokens=cfg.max_new_tokens, use_answers="answer" not in self.objective)  # fmt: skip
        for run in list(s.running):
            if run.job.id in errors:  # it cannot be taught again (nor could it be the first time): it fails alone
                self._fail(run, errors[run.job.id])
                continue
            run.teacher = self.cache.get(
                run.job.id, run.job.digest()
            )  # a damaged shard refuses the resume, naming --rebuild-cache
            if (
                run.stop_reason
            ):  # it stopped in the checkpointed step; its export was not (fully) written: finish it now
                self._finish(run, run.stop_reason)
        return True

    def _write_failed(self, error: OSError) -> str:
        """One sentence for a write that failed mid-run, after trying to save a checkpoint to resume from."""
        where = f" writing {error.filename}" if error.filename else ""
        try:
            self._checkpoint()
            advice = "a checkpoint was saved: fix it and run again with --resume"
        except OSError:
            if (self.out.root / self.dist.suffix(CHECKPOINT)).is_file():
                advice = "fix it and run again with --resume (from the last checkpoint)"
            else:
                advice = "fix it and run the same command again (no checkpoint was written yet; finished jobs are kept)"
        return f"{error.strerror or error}{where}; {advice}"

    # -- the loop -------------------------------------------------------------------------------

    def run(self, jobs: list[Job]) -> list[JobRun]:
        """Compress every job; returns the runs (DONE with ``run.report``, or FAILED with ``run.error``).

        Writes a checkpoint every ``checkpoint_every`` steps, before a step's finished jobs are exported, and when
        Ctrl-C or SIGTERM asks the run to stop: the signal only sets a flag (:mod:`fastsoft.signals`), the run stops at
        its next safe point, checkpoints and raises :class:`fastsoft.signals.Interrupted` (a ``KeyboardInterrupt``).
        The folders' locks are released when it returns or raises.
        """
        try:
            with signals.stop_requests(), signals.collective_stops() if self.dist.split else _nothing():
                return self._run(jobs)
        finally:
            self.close()

    def _stop_point(self) -> None:
        """Stop here if a signal asked to (every rank of a split run stops at the same step, so they agree first)."""
        if self.dist.split:
            asked = torch.tensor([1.0 if signals.requested() else 0.0], device=self.loaded.device)
            if float(self.dist.all_reduce_(asked)) > 0:
                raise signals.Interrupted(signals.requested() or signal.SIGTERM)
        signals.stop_if_requested(local=False)

    def _run(self, jobs: list[Job]) -> list[JobRun]:
        jobs = self._check_jobs(jobs)
        cfg = self.config
        self.jobs_hash = jobs_digest(jobs)
        self.origins = {job.id: self._origin(job) for job in jobs}
        runs = {job.id: JobRun(job, job_seed(cfg.seed, job.id)) for job in jobs}  # split when prepared (_prepare)
        if not (self.resume and self._restore(runs)):
            for run in runs.values():
                if not self.overwrite and self._finished_on_disk(run):  # a rerun keeps what it verified
                    self.scheduler.finished.append(run)
                else:
                    self.scheduler.submit(run)
        done = sum(cfg.steps if r.state in (State.DONE, State.FAILED) else r.step for r in runs.values())
        progress = RunProgress(len(jobs) * cfg.steps, done, enabled=self.progress)
        try:
            while self.scheduler.busy:
                self._stop_point()
                admitted = self.scheduler.admit()
                if admitted:
                    studying = any(cfg.makes_queries(bool(r.job.queries)) for r in admitted)
                    stages = "self-study and teacher" if studying else "teacher"
                    progress.say(f"{stages}: {', '.join(r.job.id for r in admitted)}")
                    progress.advance(cfg.steps * len(self._admit(admitted)))
                stepped = self._train_step()
                self.loop_steps += 1
                stopped = [run for run in stepped if run.error or run.stop_reason]
                # before any export: a run killed while exporting resumes from the very step these jobs stopped at
                if stopped or self.loop_steps % self.checkpoint_every == 0:
                    self._checkpoint()
                progress.advance(len(stepped))
                for run in stopped:
                    if run.error:
                        self._fail(run, FastsoftError(run.error))
                    else:
                        progress.say(f"eval {run.job.id}")
                        progress.advance(cfg.steps - run.step)
                        self._finish(run, run.stop_reason)
                    signals.stop_if_requested()  # between two exports (a resume finishes the others)
                progress.after_step(
                    self.scheduler.counts(),
                    self.scored_tokens / max(self.train_seconds, 1e-9),
                    {r.job.id: r.losses[-1] for r in self.scheduler.running if r.losses},
                )
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


@contextmanager
def _nothing() -> Iterator[None]:
    yield


DROPPED_COUNTS = ("duplicate_queries", "held_out_overlap", "duplicate_eval_queries")


def _left(counts: dict[str, int]) -> str:
    """Why a job that had queries has none left, for its error ("" when it never had any)."""
    overlap = counts.get("held_out_overlap", 0)
    return f" left once the {overlap} that are also eval queries are dropped" if overlap else ""
