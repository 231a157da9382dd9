"""Stage 3, train: packed student steps over the prompt slots, the training jobs of each step chosen by the scheduler
(``fastsoft/train/scheduler.py``), the token budget halved and the step replanned when the device runs out of memory.

State in the checkpoint: the prompt bank (slots and per-slot Adam), the token budget and the global RNG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from fastsoft.errors import FastsoftError
from fastsoft.frozen.packing import Segment
from fastsoft.pipeline.context import RunContext
from fastsoft.train.bank import PromptBank
from fastsoft.train.lr_schedule import lr_at
from fastsoft.train.objectives import divergence_of, job_loss_sums, tokens_per_job
from fastsoft.train.progress import RunProgress
from fastsoft.train.prompt_init import init_prompt
from fastsoft.train.scheduler import JobRun, State
from fastsoft.train.stopping import plateau_window, plateaued


class TrainStage:
    name = "train"

    def __init__(self, ctx: RunContext, on_step: Callable[[list[JobRun]], None] | None = None):
        self.ctx, self.on_step = ctx, on_step
        config, loaded = ctx.config, ctx.loaded
        self.needs_teacher = any(divergence_of(name) is not None for name in ctx.objective)  # kl, rkl or jsd
        self.bank = PromptBank(config.slots, config.prompt_length, loaded.hidden_size, device=loaded.device)
        # the progress bar's rate over this process's steps: scored tokens of its jobs (split: of all ranks, all-reduced)
        self.scored_tokens, self.train_seconds = 0, 0.0
        self.oom_retries = 0

    def start(self, run: JobRun) -> None:
        """Put a taught run's initial prompt in its slot: it trains from the next step."""
        cfg, job = self.ctx.config, run.job
        context_length = len(run.teacher.context_ids)
        if cfg.prompt_length > context_length:
            raise FastsoftError(
                f"prompt length {cfg.prompt_length} is larger than the context of job {job.id!r} ({context_length} "
                "tokens); pass a shorter --prompt-length (prompt_length=)"
            )
        prompt = init_prompt(
            self.ctx.loaded, run.teacher.context_ids, cfg.prompt_length, cfg.init, run.generator, cfg.init_text
        )
        self.bank.assign(run.slot, prompt)
        run.state = State.TRAINING

    @property
    def scored_per_second(self) -> float:
        return self.scored_tokens / max(self.train_seconds, 1e-9)

    def step(self) -> list[JobRun]:
        """:meth:`_step`, lowering the token budget and retrying when the device runs out of memory."""
        scheduler = self.ctx.scheduler
        while True:
            try:
                return self._step()
            except torch.OutOfMemoryError:
                self.bank.prompts.grad = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                budget = scheduler.token_budget
                if budget <= 1:
                    raise FastsoftError(
                        "out of device memory even for a single job's minibatch; lower --batch-queries"
                    ) from None
                scheduler.token_budget = max(1, budget // 2)
                self.oom_retries += 1
                RunProgress.note(
                    f"out of memory in a step; token budget lowered from {budget} to {scheduler.token_budget}, retrying"
                )

    def _segments(self, run: JobRun, queries: list[int]) -> list[Segment]:
        return [
            Segment(run.slot, run.teacher.train[q].before, run.teacher.train[q].after, run.teacher.train[q].answer)
            for q in queries
        ]

    def _share(self, queries: list[int]) -> list[int]:
        """This rank's part of a minibatch (all of it unless jobs are split across ranks)."""
        dist = self.ctx.dist
        return queries[dist.rank :: dist.world] if dist.split else queries

    def _step(self) -> list[JobRun]:
        """One optimizer step over the training jobs that fit the token budget; returns them, each with its stop
        decision made (``stop_reason`` or ``error`` set when it stops here).

        Before the commit at the end nothing a checkpoint keeps changes but the minibatches drawn (kept until they
        run), so an out-of-memory retry in the forward or backward replans the very same step. Signals only set a
        flag (:mod:`fastsoft.signals`): a draw and the commit are never cut.
        """
        ctx, cfg, P = self.ctx, self.ctx.config, self.ctx.config.prompt_length
        training = [r for r in ctx.scheduler.running if r.state is State.TRAINING]
        for run in training:
            if not run.pending:
                run.pending = run.next_batch(cfg.batch_queries)
        lengths = {r.slot: [s.length(P) for s in self._segments(r, r.pending)] for r in training}
        chosen = ctx.scheduler.plan({r.slot: r.pending for r in training}, lengths)
        if not chosen:
            return []
        if self.on_step is not None:
            self.on_step(chosen)
        started = time.perf_counter()
        sums, counts = self._losses(chosen)
        losses = (sums.detach() / counts.clamp_min(1)).cpu().tolist()
        elapsed = time.perf_counter() - started
        # the commit: what a checkpoint keeps changes from here on, all of it
        self.bank.step({run.slot: lr_at(run.step, cfg.steps, cfg.lr, cfg.warmup) for run in chosen})
        ctx.scheduler.commit(chosen)
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

    def _losses(self, chosen: list[JobRun]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one step: per-job summed token losses ``[jobs]`` and scored-token counts ``[jobs]``
        (both over every rank in a split run); the slots' gradient is left in ``bank.prompts.grad``."""
        ctx, cfg = self.ctx, self.ctx.config
        device, dist = ctx.loaded.device, ctx.dist
        segments, job_of_segment, parts = [], [], []
        for index, run in enumerate(chosen):
            mine = self._share(run.pending)
            segments += self._segments(run, mine)
            job_of_segment += [index] * len(mine)
            offsets = run.teacher.row_offsets
            parts += [run.teacher.targets[offsets[q] : offsets[q + 1]] for q in mine]
        counts = tokens_per_job(segments, job_of_segment, len(chosen)).to(device)
        counts = dist.all_reduce_(counts) if dist.split else counts
        sums = torch.zeros(len(chosen), device=device)  # per-job summed token losses on this rank
        if segments:
            teacher = type(parts[0]).concat(parts) if self.needs_teacher else None
            sums = job_loss_sums(
                ctx.loaded,
                self.bank.prompts,
                segments,
                job_of_segment,
                len(chosen),
                teacher,
                ctx.objective,
                temperature=cfg.temperature,
                backend=cfg.backend,
                grad_filter=cfg.grad_filter,
                share_prefix=cfg.share_prefix,
            )
            # each slot's gradient comes from its own job's mean loss only (normalised by the job's global count)
            (sums / counts.clamp_min(1)).sum().backward()
        if dist.split:
            grad = self.bank.prompts.grad if self.bank.prompts.grad is not None else torch.zeros_like(self.bank.prompts)
            self.bank.prompts.grad = dist.all_reduce_(grad)
            sums = dist.all_reduce_(sums.detach())
        return sums, counts

    def _stop_reason(self, run: JobRun) -> str | None:
        cfg = self.ctx.config
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

    def state_dict(self) -> dict:
        return {
            "bank": self.bank.state_dict(),
            "token_budget": self.ctx.scheduler.token_budget,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])
        self.ctx.scheduler.token_budget = state["token_budget"]
        torch.set_rng_state(state["torch_rng"])
