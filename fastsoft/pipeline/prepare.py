"""Stage 1, prepare: each job's final queries — its own without repeats or held-out ones, the synthetic ones the
model writes (self-study, one continuous batch for every job admitted and the next in line) — and the held-out split.

State: none in the checkpoint. What self-study wrote is saved in ``OUT/<job>/`` and read back on ``--resume``.
"""

from __future__ import annotations

import time
from collections import Counter

from fastsoft.data.jobs import Job, deduplication_note
from fastsoft.errors import FastsoftError
from fastsoft.pipeline.context import RunContext, charge
from fastsoft.teacher import synthesis as selfstudy
from fastsoft.teacher.topics import TOPICS_VERSION, topic_queries
from fastsoft.train.progress import RunProgress
from fastsoft.train.scheduler import JobRun


class PrepareStage:
    name = "prepare"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        config = ctx.config
        self.synthesis = selfstudy.SynthesisSettings(config.synthesis_temperature, config.synthesis_top_p)
        self.unprepared: dict[str, FastsoftError] = {}  # jobs whose queries could not be prepared, and why

    def check(self, jobs: list[Job]) -> tuple[list[Job], dict[str, dict[str, int]]]:
        """The jobs checked, each without repeated queries or training queries that are also held out, and per job
        what was dropped (:meth:`Job.deduplicated`'s counts; one line says so when any is not 0)."""
        duplicates = sorted(i for i, n in Counter(job.id for job in jobs).items() if n > 1)
        if duplicates:
            raise FastsoftError(f"job ids must be unique; repeated: {', '.join(duplicates)}")
        cleaned, dropped = [], {}
        for job in jobs:
            job.validate()
            job, counts = job.deduplicated()
            dropped[job.id] = counts
            if any(counts.values()) and self.ctx.dist.rank == 0:
                RunProgress.note(deduplication_note(job.id, counts))
            if not job.queries and not self.ctx.config.makes_queries(False):
                raise FastsoftError(f"job {job.id!r} has no queries{_left(counts)}: give some, or let fastsoft make "
                                    "them (--synthesize N or --topic-queries N, N > 0)")  # fmt: skip
            if "supervised" in self.ctx.objective and job.answers is None:
                raise FastsoftError(f"job {job.id!r} has no answers, which the supervised objective needs")
            cleaned.append(job)
        return cleaned, dropped

    def admit(self, runs: list[JobRun]) -> dict[str, FastsoftError]:
        """Give each run not yet prepared its final queries: the synthetic ones (written in one continuous batch for
        all of them, or read back on ``--resume``) and the held-out split. Returns ``{job id: error}``."""
        ctx, cfg = self.ctx, self.ctx.config
        errors = {r.job.id: self.unprepared[r.job.id] for r in runs if r.job.id in self.unprepared}
        todo = [r for r in runs if not r.eval_source and r.job.id not in errors]
        counts = {r.job.id: cfg.synthetic_queries(bool(r.job.queries)) for r in todo}
        topics = {r.job.id: cfg.topic_query_count(bool(r.job.queries)) for r in todo}
        studying = [r for r in todo if counts[r.job.id] or topics[r.job.id]]
        stamps, written = {}, {}
        if studying:
            stamps = {r.job.id: self._synthesis_stamp(r, counts[r.job.id], topics[r.job.id]) for r in studying}
            if ctx.resume:
                written = {r.job.id: selfstudy.load(ctx.out.job(r.job.id), stamps[r.job.id]) for r in studying}
                written = {k: v for k, v in written.items() if v is not None}
            missing = [(r.job, r.seed, counts[r.job.id]) for r in studying if r.job.id not in written]
            if missing:
                started = time.perf_counter()
                written.update(selfstudy.synthesize(ctx.loaded, ctx.template, missing, self.synthesis, topics=topics))
                charge("synthesis", [r for r in studying if r.job.id in {j.id for j, _, _ in missing}], started)
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
                if ctx.writes_reports:
                    selfstudy.save(ctx.out.job(job.id), synthesis, job.eval_queries, stamps[job.id])
            run.job, run.eval_source = job, source
        self.unprepared.update(errors)  # a waiting run prepared ahead meets its error when it is admitted
        return errors

    def _synthesis_stamp(self, run: JobRun, count: int, topics: int) -> dict:
        """What a saved synthesis must match to be reused on ``--resume``."""
        return {
            "settings": self.synthesis.fingerprint(),
            "count": count,
            "topics": topics,
            "topics_version": TOPICS_VERSION,
            "seed": run.seed,
            "job": run.job.digest(),
            "model": self.ctx.loaded.fingerprint,
            "template": self.ctx.template.fingerprint,
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _left(counts: dict[str, int]) -> str:
    """Why a job that had queries has none left, for its error ("" when it never had any)."""
    overlap = counts.get("held_out_overlap", 0)
    return f" left once the {overlap} that are also eval queries are dropped" if overlap else ""
