"""Compression jobs: one context, its training queries (and optional answers), and held-out queries.

Only the id and the context are required: a job without queries gets synthetic ones written by the model itself
(self-study, ``fastsoft/teacher/synthesis.py``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastsoft.errors import FastsoftError

JOB_KEYS = {"id", "context", "queries", "answers", "eval_queries"}
# A job's id names its folder OUT/<id>/, beside what the run itself writes there (fastsoft/io/outputs.py).
RUN_OWN_NAMES = ("cache", "summary.json")
RUN_OWN_PREFIXES = ("checkpoint",)
MAX_ID_BYTES = 255  # a file name's limit on common filesystems


def check_job_id(job_id, at: str = "") -> None:
    """Refuse an id that cannot be a folder of its own in OUT, with one sentence."""
    if not isinstance(job_id, str) or not job_id:
        raise FastsoftError(f"{at}job id {job_id!r} must be a non-empty string")
    if "/" in job_id or job_id.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in job_id):
        raise FastsoftError(f"{at}job id {job_id!r} must not contain '/' or control characters, nor start with '.'")
    if len(job_id.encode()) > MAX_ID_BYTES:
        raise FastsoftError(
            f"{at}job id {job_id[:40]!r}... is {len(job_id.encode())} bytes; at most {MAX_ID_BYTES} fit a folder name"
        )
    if job_id in RUN_OWN_NAMES or job_id.startswith(RUN_OWN_PREFIXES):
        raise FastsoftError(
            f"{at}job id {job_id!r} is a name the run writes in its output folder "
            f"({', '.join(RUN_OWN_NAMES)}, {'*, '.join(RUN_OWN_PREFIXES)}*); choose another id"
        )


@dataclass
class Job:
    id: str
    context: str
    queries: list[str] = field(default_factory=list)
    answers: list[str] | None = None
    eval_queries: list[str] = field(default_factory=list)

    def validate(self, where: str = "") -> None:
        at = f"{where}: " if where else ""
        check_job_id(self.id, at)
        if not isinstance(self.context, str) or not self.context.strip():
            raise FastsoftError(f"{at}job {self.id!r} has an empty context")
        for name in ("queries", "eval_queries"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(q, str) and q.strip() for q in values):
                raise FastsoftError(f"{at}job {self.id!r}: {name} must be a list of non-empty strings")
        if self.answers is not None:
            if not isinstance(self.answers, list) or not all(isinstance(a, str) and a.strip() for a in self.answers):
                raise FastsoftError(f"{at}job {self.id!r}: answers must be a list of non-empty strings")
            if len(self.answers) != len(self.queries):
                raise FastsoftError(
                    f"{at}job {self.id!r} has {len(self.answers)} answers for {len(self.queries)} queries"
                )

    def digest(self) -> str:
        """A hash of everything the teacher sees of this job (context, queries, answers, eval queries)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def with_eval_split(self, fraction: float = 0.2, seed: int = 0) -> Job:
        """Hold out a share of the queries for evaluation when no eval queries were given."""
        if self.eval_queries or len(self.queries) < 2:
            return self
        order = list(range(len(self.queries)))
        random.Random(f"{seed}:{self.id}").shuffle(order)
        held = set(order[: max(1, round(fraction * len(order)))])
        keep = [i for i in range(len(self.queries)) if i not in held]
        return Job(
            self.id,
            self.context,
            [self.queries[i] for i in keep],
            None if self.answers is None else [self.answers[i] for i in keep],
            [self.queries[i] for i in sorted(held)],
        )


def _read_text(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.exists():
        raise FastsoftError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise FastsoftError(f"{what} file {path} is a directory, not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FastsoftError(f"{what} file {path} is not UTF-8 text (byte {error.start})") from error


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty lines of a text file (one query per line)."""
    return [line.strip() for line in _read_text(path, what).splitlines() if line.strip()]


def job_from_files(
    context: str | Path,
    queries: str | Path | None = None,
    eval_queries: str | Path | None = None,
    answers: str | Path | None = None,
    job_id: str | None = None,
) -> Job:
    """One job from a context file and optional query files (one query per line)."""
    text = _read_text(context, "context")
    if not text.strip():
        raise FastsoftError(f"context file {context} is empty")
    job = Job(
        id=job_id or Path(context).stem,
        context=text.strip(),
        queries=read_lines(queries, "queries") if queries else [],
        answers=read_lines(answers, "answers") if answers else None,
        eval_queries=read_lines(eval_queries, "eval queries") if eval_queries else [],
    )
    if queries and not job.queries:
        raise FastsoftError(f"queries file {queries} has no queries")
    job.validate()
    return job


def read_jobs(path: str | Path) -> list[Job]:
    """Jobs from JSONL, one ``{"id", "context", "queries"?, "answers"?, "eval_queries"?}`` object a line."""
    jobs, seen = [], {}
    for number, line in enumerate(_read_text(path, "jobs").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise FastsoftError(f"{where} is not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise FastsoftError(f"{where} is not a JSON object")
        missing = {"id", "context"} - record.keys()
        if missing:
            raise FastsoftError(f"{where} lacks the key(s) {', '.join(sorted(missing))}")
        unknown = record.keys() - JOB_KEYS
        if unknown:
            raise FastsoftError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}")
        job = Job(
            id=record["id"],
            context=record["context"],
            queries=record.get("queries", []),
            answers=record.get("answers"),
            eval_queries=record.get("eval_queries") or [],
        )
        job.validate(where)
        if job.id in seen:
            raise FastsoftError(f"{where} repeats the job id {job.id!r} of line {seen[job.id]}")
        seen[job.id] = number
        jobs.append(job)
    if not jobs:
        raise FastsoftError(f"jobs file {path} has no jobs")
    return jobs
