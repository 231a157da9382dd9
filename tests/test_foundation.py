"""Models, templates, jobs, the teacher cache, prompt initialisation, schedule and the prompt bank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastsoft.train.bank import PromptBank
from fastsoft.teacher.cache import TeacherCache
from fastsoft.teacher.targets import CacheSpec
from fastsoft.errors import FastsoftError
from fastsoft.data.jobs import job_from_files, read_jobs
from fastsoft.models import load_model
from fastsoft.train.objectives import parse_objective
from fastsoft.train.prompt_init import init_prompt
from fastsoft.train.lr_schedule import lr_at
from fastsoft.teacher.batching import teach
from fastsoft.data.templates import encode, make_template


def test_model_is_frozen_and_fingerprinted(tiny, tiny_model_dir):
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert tiny.fingerprint == load_model(tiny_model_dir).fingerprint
    assert tiny.lm_weight.shape == (tiny.vocab_size, 64)


def test_model_path_errors(tmp_path):
    with pytest.raises(FastsoftError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FastsoftError, match="neither"):
        load_model(tmp_path)


def test_templates_put_sigma_exactly_where_the_context_was(tiny):
    chat = make_template(tiny.tokenizer)
    assert chat.kind == "chat" and chat.head.endswith("<|im_start|>user\n") and chat.tail.endswith("<|im_start|>assistant\n")
    before, after = chat.split("Q?")
    assert before == chat.head and after == chat.middle + "Q?" + chat.tail
    first = make_template(tiny.tokenizer, placement="first")
    assert first.split("Q?") == ("", chat.head + chat.middle + "Q?" + chat.tail)
    plain = make_template(tiny.tokenizer, kind="plain")
    assert plain.split("Q?")[1] == "\n\nQuestion: Q?\nAnswer:"
    with pytest.raises(FastsoftError, match="placement"):
        make_template(tiny.tokenizer, placement="middle")


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


def test_objective_parsing():
    assert parse_objective("kl") == {"kl": 1.0}
    assert parse_objective("kl:0.7,answer:0.3") == {"kl": 0.7, "answer": 0.3}
    for bad in ("kld", "kl:x", "answer,supervised", "kl:0"):
        with pytest.raises(FastsoftError):
            parse_objective(bad)


def test_teacher_greedy_answers_come_from_their_own_hidden_states(tiny, tiny_job):
    template = make_template(tiny.tokenizer)
    taught = teach(tiny, template, tiny_job.id, tiny_job.context, tiny_job.queries[:2], None, max_new_tokens=6)
    context_ids = encode(tiny.tokenizer, tiny_job.context)
    for t in taught:
        assert len(t.answer) == len(t.hidden) <= 6
        assert tiny.logits(t.hidden).argmax(-1).tolist() == t.answer  # greedy: each answer token is the argmax
        # one teacher-forced pass over the full sequence gives the same hidden states
        ids = torch.tensor([t.before + context_ids + t.after + t.answer])
        forced = tiny.hidden_states(input_ids=ids)[0, -len(t.answer) - 1 : -1]
        torch.testing.assert_close(forced, t.hidden, rtol=1e-4, atol=1e-4)
    given = teach(tiny, template, tiny_job.id, tiny_job.context, ["Who?"], ["Odile Varsk"], max_new_tokens=6)[0]
    assert given.answer == encode(tiny.tokenizer, "Odile Varsk") + [tiny.tokenizer.eos_token_id]


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled", "hidden"])
def test_cache_kinds_round_trip(tiny, tiny_job, tmp_path, kind):
    template = make_template(tiny.tokenizer)
    train = teach(tiny, template, "j", tiny_job.context, tiny_job.queries[:3], None, max_new_tokens=4)
    held = teach(tiny, template, "j", tiny_job.context, tiny_job.eval_queries, None, max_new_tokens=4)
    spec = CacheSpec(kind=kind, top_k=8, samples=32)
    hidden = torch.cat([t.hidden for t in train])
    targets = spec.build(tiny.lm_weight, hidden, torch.Generator().manual_seed(0))
    fingerprint = {"model": tiny.fingerprint, "template": template.fingerprint, "kind": kind, "params": spec.params()}
    cache = TeacherCache(tmp_path, fingerprint, spec.target_type)
    cache.put("j", [1, 2, 3], train, targets, held, flush=False)
    assert not TeacherCache(tmp_path, fingerprint, spec.target_type).has("j")  # written, not yet indexed: it would be taught again
    cache.flush()
    got = TeacherCache(tmp_path, fingerprint, spec.target_type).get("j")
    assert [t.answer for t in got.train] == [t.answer for t in train]
    assert got.row_offsets[-1] == len(hidden) and got.context_ids == [1, 2, 3]
    torch.testing.assert_close(torch.cat([t.hidden for t in got.eval]), torch.cat([t.hidden for t in held]))
    teacher = got.targets
    probs = torch.softmax(tiny.logits(hidden), -1)
    if kind == "dense":
        torch.testing.assert_close(teacher.logprobs.exp(), probs, rtol=1e-5, atol=1e-6)
    elif kind == "hidden":
        torch.testing.assert_close(teacher.hidden, hidden)
    elif kind == "topk":
        assert teacher.ids.shape[1] == 8
        torch.testing.assert_close(teacher.probs, probs.gather(1, teacher.ids.long()))
        torch.testing.assert_close(teacher.tail, 1 - teacher.probs.sum(-1), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(teacher.probs.sum(-1), torch.ones(len(hidden)))
        assert ((teacher.probs * 32) - (teacher.probs * 32).round()).abs().max() < 1e-5  # counts / samples
    other = {**fingerprint, "template": "something-else"}
    with pytest.raises(FastsoftError, match="another prompt template"):
        TeacherCache(tmp_path, other, spec.target_type)
    shard = tmp_path / "j.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FastsoftError, match="truncated or corrupted"):
        TeacherCache(tmp_path, fingerprint, spec.target_type).get("j")


@pytest.mark.parametrize("method", ["context", "pooled", "vocab", "text", "random"])
def test_prompt_inits(tiny, method):
    context_ids = list(range(5, 45))
    prompt = init_prompt(tiny, context_ids, 8, method, torch.Generator().manual_seed(0), text="hello world")
    assert prompt.shape == (8, 64) and torch.isfinite(prompt).all()
    table = tiny.embed.weight.float()
    if method == "pooled":
        pooled = table[context_ids[:5]].mean(0)
        torch.testing.assert_close(prompt[0], pooled / pooled.norm() * table.norm(dim=-1).mean())
    if method == "context":  # 8 of the 40 context tokens, evenly spaced
        assert torch.equal(prompt, table[[5, 11, 16, 22, 27, 33, 38, 44]])
    if method == "text":
        hello = tiny.tokenizer("hello world", add_special_tokens=False)["input_ids"]
        assert torch.equal(prompt, init_prompt(tiny, hello, 8, "context"))
    if method == "random":
        torch.testing.assert_close(prompt.norm(dim=-1), torch.full((8,), float(table.norm(dim=-1).mean())))
    with pytest.raises(FastsoftError):
        init_prompt(tiny, [], 4, "nope" if method in ("vocab", "random") else method)


def test_schedule_is_warmup_then_cosine():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_bank_updates_only_the_slots_given():
    bank = PromptBank(3, 2, 4)
    for slot in range(3):
        bank.assign(slot, torch.full((2, 4), float(slot)))
    (bank.prompts[0].sum() + 0 * bank.prompts[1].sum()).backward()  # slot 1 present with zero grad, slot 2 absent
    bank.step({0: 0.1, 1: 0.1})
    before = bank.get(1)
    (bank.prompts[0].sum()).backward()
    bank.step({0: 0.1})
    assert torch.equal(bank.get(1), before)  # Adam with zero grad would still move it: it was masked out
    assert torch.equal(bank.get(2), torch.full((2, 4), 2.0))
    assert bank.steps.tolist() == [2, 1, 0]
    torch.testing.assert_close(bank.get(0), torch.full((2, 4), -0.2))  # Adam's first steps move by lr each


def test_ci_runs_exactly_the_readme_test_command():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = readme.split("# 2. Run the test suite")[1].splitlines()[1].strip()
    assert command.endswith("python -m pytest -q tests")
    assert command in [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
