"""Stage 2, teach: the frozen model with the full context answers every training and held-out query, and what the
student must match is cached on disk (``fastsoft/teacher/cache.py``), one shard a job, in one continuous batch for
every job admitted and the next in line.

State: none in the checkpoint; the cache is on disk, keyed by a fingerprint of the model, template, kind and its
parameters, and checked against each job's digest.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fastsoft.data.jobs import Job
from fastsoft.data.templates import encode
from fastsoft.errors import FastsoftError
from fastsoft.pipeline.context import RunContext, charge
from fastsoft.teacher import synthesis as selfstudy
from fastsoft.teacher.batching import teach_jobs
from fastsoft.teacher.cache import TeacherCache
from fastsoft.teacher.targets import CacheSpec
from fastsoft.train.scheduler import JobRun


class TeachStage:
    name = "teach"

    def __init__(self, ctx: RunContext, cache_root: Path, rebuild: bool = False):
        self.ctx = ctx
        config = ctx.config
        self.spec = CacheSpec.of(config)
        self.use_answers = "answer" not in ctx.objective
        answers = "given-else-greedy" if self.use_answers else "greedy"
        params = {**self.spec.params(), "answers": answers, "max_new_tokens": config.max_new_tokens}
        if config.synthesize != 0:  # synthetic queries are written with these settings (counts: in each job's digest)
            settings = selfstudy.SynthesisSettings(config.synthesis_temperature, config.synthesis_top_p)
            params["synthesis"] = settings.fingerprint()
        fingerprint = {
            "model": ctx.loaded.fingerprint,
            "vocab_size": ctx.loaded.vocab_size,
            "template": ctx.template.fingerprint,
            "kind": self.spec.kind,
            "params": params,
        }
        self.cache = TeacherCache(cache_root, fingerprint, self.spec.target_type, rebuild=rebuild)

    def admit(self, runs: list[JobRun]) -> dict[str, FastsoftError]:
        """Teach the runs the cache lacks (one continuous batch); returns ``{job id: error}`` of those that failed."""
        started = time.perf_counter()
        errors = teach_into_cache(
            self.ctx.loaded,
            self.ctx.template,
            self.cache,
            self.spec,
            [(r.job, r.seed) for r in runs],
            max_new_tokens=self.ctx.config.max_new_tokens,
            use_answers=self.use_answers,
        )
        charge("teacher", runs, started)
        return errors

    def attach(self, run: JobRun) -> None:
        """Give a taught run its teacher from the cache (a damaged shard refuses, naming --rebuild-cache)."""
        run.teacher = self.cache.get(run.job.id, run.job.digest())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def teach_into_cache(
    loaded, template, cache: TeacherCache, spec: CacheSpec, jobs: list[tuple[Job, int]], *, max_new_tokens: int,
    use_answers: bool,
) -> dict[str, FastsoftError]:  # fmt: skip
    """Teach every ``(job, seed)`` not yet in ``cache`` and write its shard; returns ``{job id: error}`` for the jobs that failed.

    ``seed`` seeds the job's sampled teacher (the ``sampled`` kind), so a job's cache never depends on the
    other jobs. A job whose teacher outputs hold NaN or infinities fails alone and nothing is cached for it.
    """
    todo = [(job, seed) for job, seed in jobs if not cache.has(job.id, job.digest())]
    if not todo:
        return {}
    errors = {}
    taught = teach_jobs(loaded, template, [job for job, _ in todo], max_new_tokens, use_answers=use_answers)
    for job, seed in todo:
        result = taught[job.id]
        if isinstance(result, FastsoftError):
            errors[job.id] = result
            continue
        train, held = result
        if not all(bool(torch.isfinite(t.hidden).all()) for t in train + held):  # never cache a poisoned teacher
            errors[job.id] = FastsoftError(
                f"the model's outputs for job {job.id!r} are NaN or infinite in the teacher pass "
                f"(try --dtype fp32); nothing was cached for it"
            )
            continue
        targets = spec.build(
            loaded.lm_weight, torch.cat([t.hidden for t in train]), torch.Generator().manual_seed(seed)
        )
        cache.put(job.id, encode(loaded.tokenizer, job.context), train, targets, held, flush=False, digest=job.digest())
    cache.flush()
    return errors
