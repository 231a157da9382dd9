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
BOM = b"\xef\xbb\xbf"


def query_key(query: str) -> str:
    """What makes two queries the same question: equal up to case and whitespace."""
    return " ".join(query.split()).casefold()


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
        if not isinstance(self.context, str) or not self.context or self.context.isspace():  # no copy of a long text
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
        # Hashing a 50 MB context takes up to a second and the engine asks several times per job, so the last result is
        # kept beside what it was made from (not a dataclass field: asdict, eq and repr never see it). A field changed
        # or reassigned since gives another key and a new hash; the context compares by identity first (a str never
        # changes), so a hit costs no pass over the text.
        key = (
            self.id,
            self.context,
            tuple(self.queries),
            None if self.answers is None else tuple(self.answers),
            tuple(self.eval_queries),
        )
        memo = self.__dict__.get("_digest")
        if memo is None or memo[0] != key:
            memo = (key, hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32])
            self.__dict__["_digest"] = memo
        return memo[1]

    def deduplicated(self) -> tuple[Job, dict[str, int]]:
        """The job without repeated queries and with no training query that is also held out, and what was dropped.

        Queries match up to case and whitespace (:func:`query_key`). Dropped from the training queries (their answers
        with them): those that are also eval queries (``held_out_overlap``: a held-out score is only one when the
        queries were never trained on) and repeats of an earlier one (``duplicate_queries``; the first is kept, with its
        answer, even when the repeat's answer differs). Repeated eval queries (``duplicate_eval_queries``) keep their
        first. The job itself when nothing is dropped. A job whose queries all overlap ends with none: the caller
        tells it by ``not job.queries`` and ``counts["held_out_overlap"]``.
        """
        held = set()
        eval_queries = []
        for query in self.eval_queries:
            key = query_key(query)
            if key not in held:
                held.add(key)
                eval_queries.append(query)
        seen, keep, overlap, repeats = set(), [], 0, 0
        for index, query in enumerate(self.queries):
            key = query_key(query)
            if key in held:
                overlap += 1
            elif key in seen:
                repeats += 1
            else:
                seen.add(key)
                keep.append(index)
        counts = {
            "duplicate_queries": repeats,
            "held_out_overlap": overlap,
            "duplicate_eval_queries": len(self.eval_queries) - len(eval_queries),
        }
        if not any(counts.values()):
            return self, counts
        answers = None if self.answers is None else [self.answers[i] for i in keep]
        return Job(self.id, self.context, [self.queries[i] for i in keep], answers, eval_queries), counts

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


def deduplication_note(job_id: str, counts: dict[str, int]) -> str:
    """The one warning line for what :meth:`Job.deduplicated` dropped ("" when nothing was)."""
    parts = []
    if counts.get("held_out_overlap"):
        parts.append(f"{counts['held_out_overlap']} training queries that are also held-out eval queries")
    if counts.get("duplicate_queries"):
        parts.append(f"{counts['duplicate_queries']} repeated training queries")
    if counts.get("duplicate_eval_queries"):
        parts.append(f"{counts['duplicate_eval_queries']} repeated eval queries")
    if not parts:
        return ""
    return f"job {job_id!r}: dropped {' and '.join(parts)} (compared up to case and whitespace; the first is kept)"


def _read_text(path: str | Path, what: str) -> str:
    """The whole file as one str, without a leading byte-order mark (which would start the first query or context)."""
    path = Path(path)
    if not path.exists():
        raise FastsoftError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise FastsoftError(f"{what} file {path} is a directory, not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        with path.open("rb") as file:  # utf-8-sig counts bytes after the mark
            start = error.start + (len(BOM) if file.read(len(BOM)) == BOM else 0)
        raise FastsoftError(f"{what} file {path} is not UTF-8 text (byte {start})") from error


def _lines(text: str) -> list[str]:
    # Only newlines end a line (read_text made \r\n and \r into \n): splitlines() also splits at U+2028, U+0085 and
    # form feeds, which may stand inside a JSON string or a query.
    return text.split("\n")


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty lines of a text file (one query per line)."""
    return [line.strip() for line in _lines(_read_text(path, what)) if line.strip()]


def job_from_files(
    context: str | Path,
    queries: str | Path | None = None,
    eval_queries: str | Path | None = None,
    answers: str | Path | None = None,
    job_id: str | None = None,
) -> Job:
    """One job from a context file and optional query files (one query per line)."""
    text = _read_text(context, "context").strip()
    if not text:
        raise FastsoftError(f"context file {context} is empty")
    job = Job(
        id=job_id or Path(context).stem,
        context=text,
        queries=read_lines(queries, "queries") if queries else [],
        answers=read_lines(answers, "answers") if answers else None,
        eval_queries=read_lines(eval_queries, "eval queries") if eval_queries else [],
    )
    # a file given but empty is a mistake (an empty eval file would quietly hold out training queries instead)
    for given, values, what in ((queries, job.queries, "queries"), (eval_queries, job.eval_queries, "eval queries")):
        if given and not values:
            raise FastsoftError(f"{what} file {given} has no queries; give one query per line")
    if answers and not job.answers:
        raise FastsoftError(f"answers file {answers} has no answers; give one answer per line, in the queries' order")
    job.validate()
    return job


def read_jobs(path: str | Path) -> list[Job]:
    """Jobs from JSONL, one ``{"id", "context", "queries"?, "answers"?, "eval_queries"?}`` object a line."""
    jobs, seen = [], {}
    for number, line in enumerate(_lines(_read_text(path, "jobs")), start=1):
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
