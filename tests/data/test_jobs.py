"""Jobs files and context/queries files: line-numbered errors, the held-out split."""

from __future__ import annotations

import json

import pytest

from fastsoft.data.jobs import job_from_files, read_jobs
from fastsoft.errors import FastsoftError


def test_read_jobs_reports_line_numbers(tmp_path):
    path = tmp_path / "jobs.jsonl"
    good = {"id": "a", "context": "ctx", "queries": ["q1", "q2"], "answers": ["x", "y"]}
    path.write_text(json.dumps(good) + "\n\n" + "{broken\n")
    with pytest.raises(FastsoftError, match="line 3 is not valid JSON"):
        read_jobs(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "context": "  "}) + "\n")
    with pytest.raises(FastsoftError, match="line 2: job 'a' has an empty context"):
        read_jobs(path)
    path.write_text(json.dumps({**good, "queries": ["q1", " \t"]}) + "\n")
    with pytest.raises(FastsoftError, match="line 1: job 'a': queries must be a list of non-empty strings"):
        read_jobs(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(FastsoftError, match="line 2 repeats the job id 'a' of line 1"):
        read_jobs(path)
    path.write_text(json.dumps({**good, "answers": ["x"]}) + "\n")
    with pytest.raises(FastsoftError, match="1 answers for 2 queries"):
        read_jobs(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_jobs(path)[0].answers == ["x", "y"]


def test_job_from_files_and_eval_split(tmp_path):
    (tmp_path / "c.txt").write_text("Some context.\n")
    (tmp_path / "q.txt").write_text("one?\n\ntwo?\nthree?\nfour?\nfive?\n")
    job = job_from_files(tmp_path / "c.txt", tmp_path / "q.txt")
    assert job.id == "c" and job.queries == ["one?", "two?", "three?", "four?", "five?"]
    split = job.with_eval_split(0.2, seed=0)
    assert len(split.eval_queries) == 1 and len(split.queries) == 4
    assert set(split.queries) | set(split.eval_queries) == set(job.queries)
    assert split.eval_queries == job.with_eval_split(0.2, seed=0).eval_queries
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(FastsoftError, match="is empty"):
        job_from_files(tmp_path / "empty.txt", tmp_path / "q.txt")
    with pytest.raises(FastsoftError, match="no queries"):
        job_from_files(tmp_path / "c.txt", tmp_path / "empty.txt")
    with pytest.raises(FastsoftError, match="is a directory"):
        job_from_files(tmp_path / "c.txt", tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FastsoftError, match="not UTF-8"):
        job_from_files(tmp_path / "latin1.txt", tmp_path / "q.txt")
