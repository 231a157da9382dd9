"""Jobs files and context/queries files: line-numbered errors, the held-out split, what a file must not smuggle in."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from fastsoft.data import jobs as jobs_module
from fastsoft.data.jobs import Job, deduplication_note, job_from_files, read_jobs
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


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A BOM (Notepad's UTF-8) would start the context or first query, or make a jobs file's first line bad JSON."""
    bom = "\ufeff"
    for name, text in [("c.txt", "Some context.\n"), ("q.txt", "one?\ntwo?\n"), ("a.txt", "x\ny\n"), ("e.txt", "e?\n")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        (tmp_path / f"bom-{name}").write_text(bom + text, encoding="utf-8")
    plain = job_from_files(tmp_path / "c.txt", tmp_path / "q.txt", tmp_path / "e.txt", tmp_path / "a.txt", "j")
    marked = job_from_files(
        tmp_path / "bom-c.txt", tmp_path / "bom-q.txt", tmp_path / "bom-e.txt", tmp_path / "bom-a.txt", "j"
    )
    assert marked == plain and marked.context == "Some context." and marked.queries[0] == "one?"
    assert marked.digest() == plain.digest()
    path = tmp_path / "jobs.jsonl"
    path.write_text(bom + json.dumps({"id": "a", "context": "ctx", "queries": ["q"]}) + "\n", encoding="utf-8")
    assert read_jobs(path)[0].queries == ["q"]
    (tmp_path / "bad.txt").write_bytes(b"\xef\xbb\xbfab\xe9")
    with pytest.raises(FastsoftError, match=r"not UTF-8 text \(byte 5\)"):  # counted from the file's first byte
        job_from_files(tmp_path / "bad.txt")


def test_only_newlines_end_a_line(tmp_path):
    """U+2028 and U+0085 may stand raw inside a JSON string (ensure_ascii=False writers); they do not end a job."""
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"id": "a", "context": "one\u2028two\x85three"}, ensure_ascii=False) + "\r\n")
    assert read_jobs(path)[0].context == "one\u2028two\x85three"
    (tmp_path / "c.txt").write_text("ctx")
    (tmp_path / "q.txt").write_text("first\u2028still first?\r\nsecond?\n")
    assert job_from_files(tmp_path / "c.txt", tmp_path / "q.txt").queries == ["first\u2028still first?", "second?"]


def test_empty_eval_queries_and_answers_files_are_refused(tmp_path):
    """An empty --eval-queries file would quietly hold out training queries instead; an empty --answers file is as
    much a mistake as an empty --queries file."""
    (tmp_path / "c.txt").write_text("Some context.\n")
    (tmp_path / "q.txt").write_text("one?\ntwo?\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(FastsoftError, match=r"eval queries file .*empty.txt has no queries; give one query per line"):
        job_from_files(tmp_path / "c.txt", tmp_path / "q.txt", eval_queries=tmp_path / "empty.txt")
    with pytest.raises(FastsoftError, match=r"answers file .*empty.txt has no answers; give one answer per line"):
        job_from_files(tmp_path / "c.txt", tmp_path / "q.txt", answers=tmp_path / "empty.txt")


def test_deduplicated_drops_repeats_and_held_out_queries_from_training():
    job = Job(
        "a",
        "ctx",
        ["Who?", "what  is it?", "who?", "When?", " What is\tit? ", "Where?"],
        ["w1", "x1", "w2", "t1", "x2", "p1"],
        ["When?", "where?", "WHERE?"],
    )
    cleaned, counts = job.deduplicated()
    assert counts == {"duplicate_queries": 2, "held_out_overlap": 2, "duplicate_eval_queries": 1}
    # the first of each kept, its answer with it (a repeat with another answer is still a repeat)
    assert cleaned.queries == ["Who?", "what  is it?"] and cleaned.answers == ["w1", "x1"]
    assert cleaned.eval_queries == ["When?", "where?"] and cleaned.id == "a" and cleaned.context == "ctx"
    cleaned.validate()
    assert "2 training queries that are also held-out eval queries" in deduplication_note("a", counts)
    assert "\n" not in deduplication_note("a", counts)
    # without answers; eval queries only repeated among themselves
    cleaned, counts = Job("b", "ctx", ["q1", "Q1", "q2"], None, ["e", "e"]).deduplicated()
    assert cleaned.queries == ["q1", "q2"] and cleaned.answers is None and cleaned.eval_queries == ["e"]
    assert counts == {"duplicate_queries": 1, "held_out_overlap": 0, "duplicate_eval_queries": 1}
    # nothing to drop: the job itself, and no note
    clean = Job("c", "ctx", ["q1", "q2"], None, ["e"])
    assert clean.deduplicated() == (clean, dict.fromkeys(counts, 0)) and clean.deduplicated()[0] is clean
    assert deduplication_note("c", clean.deduplicated()[1]) == ""
    # every training query held out: none left, which the caller refuses unless the job can make its own
    cleaned, counts = Job("d", "ctx", ["q1", "q2"], None, ["Q1", "q2 "]).deduplicated()
    assert cleaned.queries == [] and counts["held_out_overlap"] == 2


def test_deduplicated_on_a_jobs_file_that_repeats_its_queries_as_held_out(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"id": "a", "context": "ctx", "queries": ["q1", "q2"], "eval_queries": ["q2"]}))
    cleaned, counts = read_jobs(path)[0].deduplicated()
    assert cleaned.queries == ["q1"] and counts["held_out_overlap"] == 1


def test_digest_is_computed_once_and_follows_changes(monkeypatch):
    job = Job("a", "x" * 1000, ["q1"], None, ["e"])
    expected = job.digest()
    calls = []
    real_dumps = jobs_module.json.dumps
    monkeypatch.setattr(jobs_module.json, "dumps", lambda *a, **k: calls.append(1) or real_dumps(*a, **k))
    assert job.digest() == expected and job.digest() == expected and not calls  # kept: no second pass over the text
    job.queries.append("q2")  # changed in place
    assert job.digest() != expected and len(calls) == 1
    job.queries.pop()
    assert job.digest() == expected
    job.context = "y" + job.context[1:]  # reassigned
    assert job.digest() != expected
    job.context = "x" + job.context[1:]  # the same text in another str
    assert job.digest() == expected
    assert "_digest" not in asdict(job) and job == Job("a", "x" * 1000, ["q1"], None, ["e"])
