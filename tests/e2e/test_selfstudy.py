"""Self-study end to end: contexts only, the synthetic queries on disk, honest held-out queries, resume, scale.

The chatty tiny model (``conftest.chatty``) writes random text that ends now and then; what it writes does not
matter here, only that the pipeline treats it right.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import CHATTY, CORPUS

import fastsoft
from fastsoft.cli import main
from fastsoft.config import TOPIC_QUERIES_DEFAULT
from fastsoft.io.export import load_prompt
from fastsoft.teacher.synthesis import SEED_KINDS
from fastsoft.teacher.topics import topic_queries

FAST = dict(steps=4, prompt_length=4, max_new_tokens=4, tol=0.0, batch_queries=2, slots=2, progress=False, **CHATTY)


def _contexts(n: int) -> list[fastsoft.Job]:
    words = " ".join(CORPUS).split()
    return [fastsoft.Job(f"doc{i}", " ".join(words[i % len(words) :] + words[: i % len(words)])) for i in range(n)]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_context_alone_trains_on_what_the_model_writes(chatty, tmp_path):
    (report,) = fastsoft.compress(_contexts(1), chatty, tmp_path, synthesize=16, **FAST)
    assert report["eval_source"] == "synthetic" and report["synthesis"]["kept"] >= 3
    kept = _lines(tmp_path / "doc0" / "synthetic_queries.jsonl")
    assert len(kept) == report["synthesis"]["kept"]
    asked = len(topic_queries(_contexts(1)[0].context, TOPIC_QUERIES_DEFAULT))  # about Velmora, Odile Varsk, ...
    assert asked >= 4 and report["synthesis"]["kept"] + sum(report["synthesis"]["dropped"].values()) == 16 + asked
    train = [k["query"] for k in kept if k["split"] == "train"]
    held = [k["query"] for k in kept if k["split"] == "eval"]
    assert report["queries"] == {"train": len(train), "eval": len(held)} and held and train
    assert not set(train) & set(held)  # a held-out synthetic query never trains
    for k in kept:
        assert (k["kind"] in SEED_KINDS or k["kind"] == "topic") and 0 <= k["start"] < k["end"]
    assert sum(k["kind"] == "topic" for k in kept) == asked  # the tiny model's gibberish never repeats them


def test_topic_queries_alone_train_and_a_topic_is_held_out_whole(chatty, tmp_path):
    job = _contexts(1)[0]
    (report,) = fastsoft.compress([job], chatty, tmp_path, synthesize=0, eval_fraction=0.4, **FAST)
    kept = _lines(tmp_path / "doc0" / "synthetic_queries.jsonl")
    assert [k["query"] for k in kept] == [q for q, _ in topic_queries(job.context, TOPIC_QUERIES_DEFAULT)]
    assert report["eval_source"] == "synthetic" and report["synthesis"]["kept"] == len(kept)
    splits = {}
    for k in kept:  # a topic's two questions share its span: both train or both are held out
        splits.setdefault((k["start"], k["end"]), set()).add(k["split"])
    assert all(len(s) == 1 for s in splits.values()) and {"train", "eval"} == set().union(*splits.values())
    ids = chatty.tokenizer(job.context, add_special_tokens=False)["input_ids"]
    first = kept[0]
    assert "Velmora" in chatty.tokenizer.decode(ids[first["start"] : first["end"]])


def test_a_held_out_query_never_reaches_training(chatty, tmp_path):
    (first,) = fastsoft.compress(_contexts(1), chatty, tmp_path / "a", synthesize=16, **FAST)
    written = [k["query"] for k in _lines(tmp_path / "a" / "doc0" / "synthetic_queries.jsonl")]
    job = _contexts(1)[0]
    job.eval_queries = [written[0]]  # the model will write it again: it must be dropped, not trained on
    (report,) = fastsoft.compress([job], chatty, tmp_path / "b", synthesize=16, **FAST)
    assert report["eval_source"] == "eval_queries" and report["synthesis"]["dropped"]["held_out"] >= 1
    kept = _lines(tmp_path / "b" / "doc0" / "synthetic_queries.jsonl")
    assert written[0] not in [k["query"] for k in kept] and all(k["split"] == "train" for k in kept)


def test_resume_in_the_middle_of_synthesis_ends_as_an_uninterrupted_run(chatty, tmp_path, monkeypatch):
    settings = dict(FAST, slots=1, synthesize=12)
    reference = fastsoft.compress(_contexts(3), chatty, tmp_path / "ref", **settings)
    stage = importlib.import_module("fastsoft.pipeline.prepare").selfstudy
    real, calls = stage.synthesize, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second job's admission: the first job trains, the third is not written yet
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "synthesize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fastsoft.compress(_contexts(3), chatty, tmp_path / "run", checkpoint_every=1000, **settings)
    monkeypatch.setattr(stage, "synthesize", real)
    resumed = fastsoft.compress(_contexts(3), chatty, tmp_path / "run", resume=True, **settings)
    assert [r["losses"] for r in resumed] == [r["losses"] for r in reference]
    for name in ("doc0", "doc1", "doc2"):
        ref, run = tmp_path / "ref" / name, tmp_path / "run" / name
        assert torch.equal(load_prompt(run)[0], load_prompt(ref)[0])
        assert (run / "synthetic_queries.jsonl").read_text() == (ref / "synthetic_queries.jsonl").read_text()


def test_fifty_contexts_only_jobs(chatty, tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps({"id": j.id, "context": j.context}) + "\n" for j in _contexts(50)))
    flags = {"steps": 1, "prompt-length": 4, "max-new-tokens": 4, "slots": 8, "synthesize": 8, "tol": 0.0}
    flags |= {k.replace("_", "-"): v for k, v in CHATTY.items()}
    argv = ["compress", "--jobs", str(jobs_file), "--out", str(tmp_path / "out"), "--no-progress"]
    argv += [f"--{k}={v}" for k, v in flags.items()] + ["--model", str(chatty.path)]
    code = main(argv)
    out = tmp_path / "out"
    done = [i for i in range(50) if (out / f"doc{i}" / "report.json").exists()]
    failed = [i for i in range(50) if (out / f"doc{i}" / "error.json").exists()]
    assert sorted(done + failed) == list(range(50)) and len(done) >= 40 and code == (1 if failed else 0)
    for i in failed:  # random text mostly runs on without an end token: a job whose every request was dropped
        assert "has no training queries" in json.loads((out / f"doc{i}" / "error.json").read_text())["error"]
    for i in done:
        report = json.loads((out / f"doc{i}" / "report.json").read_text())
        assert report["eval_source"] in ("synthetic", "none") and report["synthesis"]["kept"] >= 1
        assert (out / f"doc{i}" / "synthetic_queries.jsonl").exists()


def test_the_command_line_needs_no_queries(chatty_model_dir, tmp_path, capsys):
    context = tmp_path / "notes.txt"
    context.write_text(" ".join(CORPUS))
    argv = ["compress", "--context", str(context), "--out", str(tmp_path / "o"), "--model", str(chatty_model_dir)]
    argv += ["--steps", "2", "--prompt-length", "4", "--max-new-tokens", "4", "--synthesize", "12", "--no-progress"]
    argv += ["--synthesis-temperature", "3", "--synthesis-top-p", "1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "notes" / "report.json").read_text())
    assert report["eval_source"] == "synthetic"
    assert "synthetic" in capsys.readouterr().out  # the summary table says where the held-out queries come from


def test_given_answers_stay_with_their_queries_beside_synthetic_ones(chatty, tmp_path):
    job = _contexts(1)[0]
    job.queries, job.answers, job.eval_queries = ["Who keeps goats?", "What colour?"], ["Odile.", "Teal."], ["Name it."]
    (report,) = fastsoft.compress([job], chatty, tmp_path, synthesize=16, **FAST)
    assert report["eval_source"] == "eval_queries"
    assert report["queries"]["train"] == 2 + report["synthesis"]["kept"] and report["synthesis"]["kept"] >= 1
