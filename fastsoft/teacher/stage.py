"""The teacher stage as the engine runs it: teach the jobs the cache lacks, in one continuous batch, and cache them."""

from __future__ import annotations

import torch

from fastsoft.data.jobs import Job
from fastsoft.data.templates import Template, encode
from fastsoft.errors import FastsoftError
from fastsoft.teacher.batching import teach_jobs
from fastsoft.teacher.cache import TeacherCache
from fastsoft.teacher.targets import CacheSpec


def teach_into_cache(
    loaded,
    template: Template,
    cache: TeacherCache,
    spec: CacheSpec,
    jobs: list[tuple[Job, int]],
    *,
    max_new_tokens: int,
    use_answers: bool,
) -> dict[str, FastsoftError]:
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
