"""Self-study's parts: the chunk plan, the filters, and sampling that depends only on the seed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CORPUS

from fastsoft.data.jobs import Job
from fastsoft.data.templates import make_template
from fastsoft.teacher.synthesis import DROP_REASONS, SEED_KINDS, SynthesisSettings, keep_requests, plan, synthesize

SETTINGS = SynthesisSettings(temperature=3.0, top_p=1.0)


@pytest.mark.parametrize("tokens", [1, 50, 128, 394, 1000, 5000])
def test_plan_covers_the_whole_context_before_repeating_a_window(tokens):
    requests = plan(tokens, 64, seed=3)
    assert len(requests) == 64 and {k for k, _, _ in requests} <= SEED_KINDS.keys()
    covered = set()
    for _, start, end in requests:
        assert 0 <= start < end <= tokens
        covered.update(range(start, end))
    assert covered == set(range(tokens))  # 64 requests are enough to cover 5000 tokens with 512-token chunks
    assert len({(s, e) for _, s, e in requests}) > 1 or tokens <= 128
    assert plan(tokens, 64, seed=3) == requests and plan(tokens, 64, seed=4) != requests or tokens == 1


def test_filters_drop_each_reason_and_keep_the_rest():
    chunk = "the lighthouse on marrowick is painted orange and the mayor lives in pell harbour"
    spans = {(0, 10): chunk}
    requests = [
        ("What colour is the lighthouse on Marrowick?", True, "fact", 0, 10),  # kept
        ("", True, "fact", 0, 10),  # empty
        ("Who is", True, "fact", 0, 10),  # empty (under 3 words)
        ("Where does the mayor of Marrowick live and what does", False, "fact", 0, 10),  # truncated
        ("what colour is the lighthouse on marrowick ?", True, "fact", 0, 10),  # duplicate (normalised)
        ("What colour is the lighthouse on Marrowick island?", True, "fact", 0, 10),  # near duplicate
        ("The lighthouse on Marrowick is painted orange", True, "summary", 0, 10),  # copies the chunk
        ("Name the mayor of the island please.", True, "fact", 0, 10),  # a held-out query, reworded a little
        ("Summarise what the text says about the harbour.", True, "summary", 0, 10),  # kept
        ("Write one question about a fact in the text above.", True, "fact", 0, 10),  # echoes its instruction
    ]
    result = keep_requests(requests, spans, held_out=["Name the mayor of the island."])
    assert [s.query for s in result.kept] == [
        "What colour is the lighthouse on Marrowick?",
        "Summarise what the text says about the harbour.",
    ]
    assert result.dropped == {
        "empty": 2, "truncated": 1, "echoes_instruction": 1, "duplicate": 1, "near_duplicate": 1, "copies_context": 1,
        "held_out": 1,
    }  # fmt: skip
    assert tuple(result.dropped) == DROP_REASONS


def _job(i=0):
    return Job(f"job{i}", " ".join(CORPUS[i % 3 :] + CORPUS[: i % 3]))


def _queries(model, jobs):
    out = synthesize(model, make_template(model.tokenizer), jobs, SETTINGS)
    return {job_id: [(s.query, s.kind, s.start, s.end) for s in result.kept] for job_id, result in out.items()}


def test_same_seed_same_queries_other_seed_others_and_batch_mates_change_nothing(chatty):
    alone = _queries(chatty, [(_job(0), 11, 12)])
    assert alone["job0"]  # the chatty model keeps some
    assert _queries(chatty, [(_job(0), 11, 12)]) == alone
    assert _queries(chatty, [(_job(0), 12, 12)]) != alone
    together = _queries(chatty, [(_job(1), 5, 12), (_job(0), 11, 12), (_job(2), 7, 12)])
    assert together["job0"] == alone["job0"]


def test_same_seed_same_queries_in_another_process(chatty, chatty_model_dir):
    here = _queries(chatty, [(_job(0), 11, 12)])
    code = f"""
import sys, json
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1])!r})
from teacher.test_synthesis import _queries, _job
from fastsoft.frozen.loading import load_model
print(json.dumps(_queries(load_model({str(chatty_model_dir)!r}), [(_job(0), 11, 12)])))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    there = {k: [tuple(x) for x in v] for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    assert there == here


def test_expand_says_where_held_out_queries_come_from_and_keeps_given_answers():
    from fastsoft.teacher.synthesis import Synthesis, Synthetic, expand

    made = Synthesis([Synthetic(f"Question number {i}?", "fact", 0, 5) for i in range(10)])
    own = Job("j", "some context", ["Mine?", "Also mine?"], answers=["Yes.", "No."])
    job, source = expand(own, made, 0.2, seed=0)
    assert source == "synthetic" and len(job.eval_queries) == 2 and len(job.queries) == 2 + 8
    assert not set(job.eval_queries) & set(job.queries)  # held-out synthetic queries never train
    assert job.answers == [
        "Yes.",
        "No.",
        *[None] * 8,
    ]  # given answers stay with their queries; the teacher answers the rest
    with_eval = Job("j", "some context", [], eval_queries=["Held?"])
    assert (
        expand(with_eval, made, 0.2, 0)[1] == "eval_queries" and len(expand(with_eval, made, 0.2, 0)[0].queries) == 10
    )
    assert expand(own, None, 0.2, 0)[1] == "queries"  # no synthesis: a share of the job's own queries, as before
    assert expand(Job("j", "c", ["Only one?"]), None, 0.2, 0)[1] == "none"


def test_topic_questions_are_judged_by_their_phrase_and_never_crowd_out_written_ones():
    spans = {(0, 2): "Corrin", (3, 5): "Pell Harbour", (0, 10): "the ferry sails from corrin to pell harbour"}
    requests = [
        ("What does the text say about Corrin?", True, "topic", 0, 2),  # the held-out query names another thing
        ("What is Corrin?", True, "topic", 0, 2),
        ("What does the text say about Pell Harbour?", True, "topic", 3, 5),  # near the held-out one, same phrase
        ("What does the text say about the harbour?", True, "fact", 0, 10),  # written: kept beside the templates
    ]
    result = keep_requests(requests, spans, held_out=["What does the text say about Pell Harbour's boats?"])
    assert [s.query for s in result.kept] == [
        "What does the text say about Corrin?",
        "What is Corrin?",
        "What does the text say about the harbour?",
    ]
    assert result.dropped["held_out"] == 1 and result.dropped["near_duplicate"] == 0


def test_held_out_units_keep_a_topic_and_the_requests_naming_it_together():
    from fastsoft.teacher.synthesis import Synthesis, Synthetic, expand

    kept = [Synthetic(q, "topic", 0, 2) for q in ("What does the text say about Corrin?", "What is Corrin?")]
    kept += [
        Synthetic(q, "topic", 3, 5) for q in ("What does the text say about Pell Harbour?", "What is Pell Harbour?")
    ]
    kept += [Synthetic("How often does the ferry leave Corrin?", "fact", 0, 10)]
    kept += [Synthetic(f"Other question number {i}?", "fact", 0, 10) for i in range(5)]
    for seed in range(20):
        job, _ = expand(Job("j", "c"), Synthesis(kept), 0.3, seed)
        corrin = [q for q in [*job.queries, *job.eval_queries] if "Corrin" in q]
        assert all(q in job.eval_queries for q in corrin) or not any(q in job.eval_queries for q in corrin)
        assert job.eval_queries and job.queries
