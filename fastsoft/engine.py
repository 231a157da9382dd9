"""The engine: teacher pass, continuous-batching training over prompt slots, evaluation and export.

``Engine.run(jobs)`` drives the scheduler: admit waiting jobs into free slots, build (or reuse) each
admitted job's teacher cache, pack the training jobs' minibatches into one row per step, update only
the slots present, and finish a job (evaluate, export, report) as soon as it converges or spends its
step budget. A failing job is marked FAILED with its reason; the others continue.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastsoft.bank import PromptBank
from fastsoft.cache import CacheSpec, TeacherCache, concat_teachers, make_targets, teacher_from
from fastsoft.checkpoint import (CHECKPOINT, finished_state, jobs_digest, load_checkpoint, restore_finished, restore_run, run_state,
                                 save_checkpoint)
from fastsoft.config import CompressConfig
from fastsoft.distributed import Dist
from fastsoft.errors import FastsoftError
from fastsoft.evaluate import evaluate
from fastsoft.export import save_prompt
from fastsoft.jobs import Job
from fastsoft.objectives import parse_objective
from fastsoft.ops import SparseTarget, softmax_kl
from fastsoft.prompt_init import init_prompt
from fastsoft.report import write_report
from fastsoft.schedule import lr_at
from fastsoft.scheduler import JobRun, Scheduler, State, job_seed
from fastsoft.student import Segment, pack, scored_hidden
from fastsoft.teacher import TeachRequest, teach_jobs
from fastsoft.templates import encode, make_template


class Engine:
    def __init__(self, loaded, config: CompressConfig, out_dir: str | Path, cache_dir: str | Path | None = None,
                 overwrite: bool = False, progress: bool = True, resume: bool = False, checkpoint_every: int = 10,
                 rebuild_cache: bool = False, dist: Dist | None = None):
        config.validate()
        self.dist = dist or Dist()
        self.loaded, self.config, self.out = loaded, config, Path(out_dir)
        self.overwrite, self.progress, self.resume, self.checkpoint_every = overwrite, progress, resume, checkpoint_every
        self.out.mkdir(parents=True, exist_ok=True)
        self.template = make_template(loaded.tokenizer, config.placement, config.template)
        self.objective = parse_objective(config.objective)
        self.spec = CacheSpec(config.teacher, config.top_k, config.samples, config.temperature, config.cache_dtype)
        answers = "greedy" if "answer" in self.objective else "given-else-greedy"
        fingerprint = {"model": loaded.fingerprint, "vocab_size": loaded.vocab_size, "template": self.template.fingerprint, "kind": self.spec.kind,
                       "params": {**self.spec.params(), "answers": answers, "max_new_tokens": config.max_new_tokens}}
        cache_root = Path(cache_dir or self.out / "cache")
        if self.dist.active:  # each rank owns its shards and index: no two writers on one file
            cache_root = cache_root / f"rank{self.dist.rank}"
        self.cache = TeacherCache(cache_root, fingerprint, rebuild=rebuild_cache)
        self.bank = PromptBank(config.slots, config.prompt_length, loaded.hidden_size, device=loaded.device)
        self.scheduler = Scheduler(config.slots, config.token_budget)
        self.tokens_trained = 0
        self.loop_steps = 0  # loop iterations, the checkpoint clock
        self.oom_retries = 0

    # -- job life cycle ---------------------------------------------------------------------------

    @property
    def _writes_reports(self) -> bool:
        """Whether this rank evaluates and exports finished jobs (in a split run only rank 0 does)."""
        return not (self.dist.split and self.dist.rank != 0)

    def _report_file(self, job_id: str) -> Path:
        return self.out / job_id / "report.json"

    def _check_jobs(self, jobs: list[Job]) -> None:
        duplicates = sorted(i for i, n in Counter(job.id for job in jobs).items() if n > 1)
        if duplicates:
            raise FastsoftError(f"job ids must be unique; repeated: {', '.join(duplicates)}")
        for job in jobs:
            if "supervised" in self.objective and job.answers is None:
                raise FastsoftError(f"job {job.id!r} has no answers, which the supervised objective needs")
            done = self._report_file(job.id)
            if done.exists() and not self.overwrite and not self.resume:
                raise FastsoftError(f"{done.parent} already holds a finished job {job.id!r}; pass --overwrite or choose another --out")

    def _teach(self, runs: list[JobRun]) -> list[JobRun]:
        """Teach the admitted runs (and, ahead of time, as many waiting ones) in one continuous batch, cache
        them, and put each admitted run's initial prompt in its slot. Returns the admitted runs that failed."""
        cfg = self.config
        ahead = list(self.scheduler.waiting)[: len(runs)]
        todo = [r for r in runs + ahead if not self.cache.has(r.job.id)]
        errors = {}
        if todo:
            given = "answer" not in self.objective
            requests = [TeachRequest(r.job.id, r.job.context, r.job.queries, r.job.answers if given else None, r.job.eval_queries) for r in todo]
            taught = teach_jobs(self.loaded, self.template, requests, cfg.max_new_tokens)
            for run in todo:
                result = taught[run.job.id]
                if isinstance(result, FastsoftError):
                    errors[run.job.id] = result  # a waiting run meets its error again when it is admitted
                    continue
                train, held = result
                if not all(bool(torch.isfinite(t.hidden).all()) for t in train + held):  # never cache a poisoned teacher
                    errors[run.job.id] = FastsoftError(f"the model's outputs for job {run.job.id!r} are NaN or infinite in the teacher pass "
                                                       f"(try --dtype fp32); nothing was cached for it")
                    continue
                hidden = torch.cat([t.hidden for t in train])
                targets = make_targets(self.loaded.lm_weight, hidden, self.spec, torch.Generator().manual_seed(run.seed))
                self.cache.put(run.job.id, encode(self.loaded.tokenizer, run.job.context), train, targets, held, flush=False)
            self.cache.flush()
        failed = []
        for run in runs:
            job = run.job
            try:
                if job.id in errors:
                    raise errors[job.id]
                run.teacher = self.cache.get(job.id)
                context_length = len(run.teacher.context_ids)
                if cfg.prompt_length > context_length:
                    raise FastsoftError(f"prompt length {cfg.prompt_length} is larger than the context of job {job.id!r} ({context_length} tokens)")
                prompt = init_prompt(self.loaded, run.teacher.context_ids, cfg.prompt_length, cfg.init, run.generator, cfg.init_text)
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
        metrics = evaluate(self.loaded, prompt, run.teacher.eval, len(run.teacher.context_ids), 1.0, self.config.max_new_tokens)
        folder = self.out / run.job.id
        save_prompt(folder, prompt, model_path=self.loaded.path, model_fingerprint=self.loaded.fingerprint, template=self.template,
                    extra={"job_id": run.job.id, "config": self.config.to_dict()})
        run.report = {"job_id": run.job.id, **metrics, "steps": run.step, "stop_reason": reason, "seconds": run.seconds,
                      "final_loss": run.losses[-1] if run.losses else None, "context_tokens": len(run.teacher.context_ids),
                      "prompt_length": self.config.prompt_length, "objective": self.objective, "teacher": self.spec.kind,
                      "losses": run.losses}
        write_report(folder, run.report)
        self.scheduler.retire(run, State.DONE)

    def _fail(self, run: JobRun, error: Exception) -> None:
        run.error = str(error)
        self.scheduler.retire(run, State.FAILED)
        folder = self.out / run.job.id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.json").write_text(json.dumps({"job_id": run.job.id, "error": run.error}, indent=2))

    # -- one training step ----------------------------------------------------------------------

    def _segments(self, run: JobRun, queries: list[int]) -> list[Segment]:
        return [Segment(run.slot, run.teacher.train[q].before, run.teacher.train[q].after, run.teacher.train[q].answer) for q in queries]

    def _targets(self, run: JobRun, queries: list[int]):
        offsets = run.teacher.row_offsets
        return [teacher_from(self.spec.kind, run.teacher.targets, slice(offsets[q], offsets[q + 1])) for q in queries]

    def _share(self, queries: list[int]) -> list[int]:
        """This rank's part of a minibatch (all of it unless jobs are split across ranks)."""
        return queries[self.dist.rank :: self.dist.world] if self.dist.split else queries

    def step(self) -> list[JobRun]:
        """One optimizer step over the training jobs that fit the token budget; returns them."""
        cfg, P = self.config, self.config.prompt_length
        training = [r for r in self.scheduler.running if r.state is State.TRAINING]
        for run in training:
            if not run.pending:
                run.pending = run.next_batch(cfg.batch_queries)
        lengths = {r.slot: [s.length(P) for s in self._segments(r, r.pending)] for r in training}
        chosen = self.scheduler.plan({r.slot: r.pending for r in training}, lengths)
        if not chosen:
            return []
        started = time.perf_counter()
        segments, row_job, parts = [], [], []
        for index, run in enumerate(chosen):
            mine = self._share(run.pending)
            segs = self._segments(run, mine)
            segments += segs
            row_job += [index] * sum(len(s.answer) for s in segs)
            parts += self._targets(run, mine)
        device = self.loaded.device
        sums = torch.zeros(len(chosen), device=device)  # per-job summed token losses on this rank
        counts = torch.bincount(torch.tensor(row_job, dtype=torch.long), minlength=len(chosen)).to(device=device, dtype=torch.float32)
        counts = self.dist.all_reduce_(counts) if self.dist.split else counts
        if segments:
            packed = pack(segments, P)
            hidden = scored_hidden(self.loaded, self.bank.prompts, packed)  # [N, H]
            row_loss = torch.zeros(hidden.shape[0], device=device)
            for name, weight in self.objective.items():
                if weight == 0:
                    continue
                if name == "kl":
                    target = concat_teachers(parts).to(device)
                else:
                    answer_ids = torch.tensor([t for s in segments for t in s.answer], device=device)
                    target = SparseTarget.one_hot(answer_ids)
                row_loss = row_loss + weight * softmax_kl(hidden, self.loaded.lm_weight, target, temperature=cfg.temperature,
                                                           reduction="none", backend=cfg.backend)
            sums = sums.index_add(0, torch.tensor(row_job, device=device), row_loss)
            # each slot's gradient comes from its own job's mean loss only (normalised by the job's global count)
            (sums / counts.clamp_min(1)).sum().backward()
            self.tokens_trained += len(packed.ids)
        if self.dist.split:
            grad = self.bank.prompts.grad if self.bank.prompts.grad is not None else torch.zeros_like(self.bank.prompts)
            self.bank.prompts.grad = self.dist.all_reduce_(grad)
            sums = self.dist.all_reduce_(sums.detach())
        self.bank.step({run.slot: lr_at(run.step, cfg.steps, cfg.lr, cfg.warmup) for run in chosen})
        elapsed = time.perf_counter() - started
        for run, loss in zip(chosen, (sums.detach() / counts.clamp_min(1)).cpu().tolist()):
            run.step += 1
            run.losses.append(loss)
            run.seconds += elapsed
            run.pending = None
        return chosen

    def _stop_reason(self, run: JobRun) -> str | None:
        cfg = self.config
        if not all(math.isfinite(x) for x in run.losses[-1:]):
            raise FastsoftError(f"the loss of job {run.job.id!r} became {run.losses[-1]} at step {run.step}")
        recent = run.losses[-cfg.patience :]
        if len(recent) == cfg.patience and sum(recent) / len(recent) < cfg.tol:
            return "converged"
        if run.step >= cfg.steps:
            return "step budget"
        return None

    # -- the loop -------------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        s = self.scheduler
        save_checkpoint(self.out, {
            "jobs_digest": self.jobs_hash, "config": self.config.to_dict(), "bank": self.bank.state_dict(),
            "waiting": [r.job.id for r in s.waiting], "running": {r.job.id: run_state(r) for r in s.running},
            "finished": {r.job.id: finished_state(r, self._writes_reports and r.state is State.DONE) for r in s.finished},
            "token_budget": s.token_budget,
            "tokens_trained": self.tokens_trained, "loop_steps": self.loop_steps, "torch_rng": torch.get_rng_state(),
        }, self.dist.suffix(CHECKPOINT))

    def _restore(self, runs: dict[str, JobRun]) -> None:
        """Continue a checkpointed run: slots, optimizer state, queues and every job's progress."""
        state = load_checkpoint(self.out, self.jobs_hash, self.config.to_dict(), self.dist.suffix(CHECKPOINT))
        self.bank.load_state_dict(state["bank"])
        s = self.scheduler
        s.waiting.extend(runs[i] for i in state["waiting"])  # not started: as built from their seeds
        for job_id, saved in state["finished"].items():
            restore_finished(runs[job_id], saved, self._report_file(job_id), State)
            s.finished.append(runs[job_id])
        s.token_budget = state["token_budget"]
        self.tokens_trained, self.loop_steps = state["tokens_trained"], state["loop_steps"]
        torch.set_rng_state(state["torch_rng"])
        for job_id, saved in state["running"].items():
            run = runs[job_id]
            restore_run(run, saved, State)
            s.running.append(run)
            report = self._report_file(job_id)
            if report.exists():  # finished and exported after the last checkpoint: never redo it
                run.report = json.loads(report.read_text())
                s.retire(run, State.DONE)
            else:
                run.teacher = self.cache.get(job_id)

    def _train_step(self) -> list[JobRun]:
        """``step()``, lowering the token budget and retrying when the device runs out of memory."""
        while True:
            try:
                return self.step()
            except torch.OutOfMemoryError:
                self.bank.prompts.grad = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                budget = self.scheduler.token_budget
                if budget <= 1:
                    raise FastsoftError("out of device memory even for a single job's minibatch; lower --batch-queries") from None
                self.scheduler.token_budget = max(1, budget // 2)
                self.oom_retries += 1
                tqdm.write(f"fastsoft: out of memory in a step; token budget lowered from {budget} to {self.scheduler.token_budget}, retrying",
                           file=sys.stderr)

    def run(self, jobs: list[Job]) -> list[JobRun]:
        """Compress every job; returns the runs (DONE with ``run.report``, or FAILED with ``run.error``).

        Writes a checkpoint every ``checkpoint_every`` steps and on Ctrl-C (then re-raises it).
        """
        self._check_jobs(jobs)
        cfg = self.config
        self.jobs_hash = jobs_digest(jobs)
        runs = {job.id: JobRun(job.with_eval_split(cfg.eval_fraction, cfg.seed), job_seed(cfg.seed, job.id)) for job in jobs}
        if self.resume:
            self._restore(runs)
        else:
            for run in runs.values():
                self.scheduler.submit(run)
        bar = tqdm(total=len(jobs) * cfg.steps, unit="step", disable=not self.progress, dynamic_ncols=True)
        bar.update(sum(cfg.steps if r.state in (State.DONE, State.FAILED) else r.step for r in runs.values()))
        started, trained_before = time.perf_counter(), self.tokens_trained
        try:
            while self.scheduler.busy:
                admitted = self.scheduler.admit()
                if admitted:
                    bar.set_description(f"teacher {', '.join(r.job.id for r in admitted)}")
                    bar.update(cfg.steps * len(self._teach(admitted)))
                for run in self._train_step():
                    bar.update(1)
                    try:
                        reason = self._stop_reason(run)
                        if reason:
                            bar.set_description(f"eval {run.job.id}")
                            bar.update(cfg.steps - run.step)
                            self._finish(run, reason)
                    except FastsoftError as error:
                        self._fail(run, error)
                self.loop_steps += 1
                if self.loop_steps % self.checkpoint_every == 0:
                    self._checkpoint()
                counts = self.scheduler.counts()
                losses = {r.job.id: f"{r.losses[-1]:.3f}" for r in self.scheduler.running if r.losses}
                bar.set_description("train", refresh=False)
                rate = (self.tokens_trained - trained_before) / (time.perf_counter() - started)
                bar.set_postfix(**counts, tok_s=f"{rate:.0f}", loss=" ".join(f"{k}={v}" for k, v in list(losses.items())[:4]))
            self._checkpoint()
        except KeyboardInterrupt:
            self._checkpoint()
            raise
        finally:
            bar.close()
        order = {job.id: i for i, job in enumerate(jobs)}
        return sorted(self.scheduler.finished, key=lambda r: order[r.job.id])
