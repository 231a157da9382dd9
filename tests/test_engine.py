"""The engine: the shared-context continuous-batching teacher, packed multi-slot student steps, the
scheduler (slots, waiting, best-fit packing) and the independence of a job's result from its neighbours."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastsoft
import fastsoft.attention as attention_mod
from fastsoft.io.export import load_prompt
from fastsoft.data.jobs import Job
from fastsoft.ops import softmax_kl
from fastsoft.train.scheduler import JobRun, Scheduler, State
from fastsoft.train.packing import Segment, pack, scored_hidden
from fastsoft.teacher.batching import teach, teach_jobs
from fastsoft.data.templates import encode, end_token_ids, make_template, tokenize_query

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = [
    "The harbour town of Velmora paints every door teal and holds a lantern festival each spring.",
    "Its mayor, Odile Varsk, keeps seventeen goats and a blue bicycle named Comet. " * 3,
    "Velmora",
]
QUERIES = ["What colour are the doors?", "Who?", "How many goats does the mayor keep, and what is the bicycle named?",
           "When is the festival?"]


# -- the teacher ----------------------------------------------------------------------------------


_REFERENCE: dict = {}


def _alone(loaded, template, context, query, answer=None, max_new_tokens=5):
    """The reference: the full ``before + context + after`` run alone, no cache; greedy by re-running."""
    key = (id(loaded), context, query, answer, max_new_tokens)
    if key not in _REFERENCE:
        _REFERENCE[key] = _run_alone(loaded, template, context, query, answer, max_new_tokens)
    return _REFERENCE[key]


def _run_alone(loaded, template, context, query, answer, max_new_tokens):
    before, after = tokenize_query(loaded.tokenizer, template, query)
    prompt = before + encode(loaded.tokenizer, context) + after
    ends = end_token_ids(loaded)
    if answer is not None:
        ids = encode(loaded.tokenizer, answer) + [ends[0]]
        return ids, loaded.hidden_states(input_ids=torch.tensor([prompt + ids], device=loaded.device))[0, len(prompt) - 1 : -1].float()
    ids, states = [], []
    while True:
        state = loaded.hidden_states(input_ids=torch.tensor([prompt + ids], device=loaded.device))[0, -1].float()
        ids.append(int(loaded.logits(state).argmax()))
        states.append(state)
        if ids[-1] in ends or len(ids) >= max_new_tokens:
            return ids, torch.stack(states)


def _requests():
    return [
        Job("greedy", CONTEXTS[0], QUERIES, None, ["Name the mayor."]),
        Job("forced", CONTEXTS[1], QUERIES[:3], ["teal", "Odile Varsk", "seventeen goats and Comet"], QUERIES[3:]),
        Job("short", CONTEXTS[2], QUERIES[::-1]),
    ]


@pytest.mark.parametrize("budget,rows,jobs", [(4096, 64, 8), (24, 3, 2)])
def test_shared_context_teacher_equals_each_query_alone(tiny, budget, rows, jobs):
    """Several jobs in one continuous batch (queries of different lengths, some with given answers):
    same answers, same hidden states and distributions as each full context + query run alone (fp32).
    The small budget forces chunked prefixes, queries joining and leaving at different steps, and a job
    waiting for another's arena."""
    template = make_template(tiny.tokenizer)
    requests = _requests()
    taught = teach_jobs(tiny, template, requests, 5, token_budget=budget, max_rows=rows, max_jobs=jobs)
    assert list(taught) == [r.id for r in requests]
    for request in requests:
        train, held = taught[request.id]
        assert len(train) == len(request.queries) and len(held) == len(request.eval_queries)
        answers = request.answers or [None] * len(request.queries)
        for got, query, answer in [*zip(train, request.queries, answers), *((t, q, None) for t, q in zip(held, request.eval_queries))]:
            ids, hidden = _alone(tiny, template, request.context, query, answer)
            assert got.answer == ids
            assert got.hidden.dtype == torch.float32 and got.hidden.shape == (len(ids), tiny.hidden_size)
            torch.testing.assert_close(got.hidden, hidden, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.log_softmax(tiny.logits(got.hidden), -1), torch.log_softmax(tiny.logits(hidden), -1),
                                       rtol=1e-4, atol=1e-5)


def test_teach_single_job_api_and_errors(tiny):
    template = make_template(tiny.tokenizer)
    single = teach(tiny, template, "one", CONTEXTS[0], QUERIES[:2], max_new_tokens=5, batch_size=1)
    together = teach_jobs(tiny, template, [Job("one", CONTEXTS[0], QUERIES[:2]), Job("two", CONTEXTS[1], QUERIES)], 5)
    for a, b in zip(single, together["one"][0]):
        assert a.answer == b.answer and a.before == b.before and a.after == b.after
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-6)
    # a job too long for the model fails alone; the others are taught
    results = teach_jobs(tiny, template, [Job("long", "word " * 3000, QUERIES[:1]), Job("ok", CONTEXTS[2], QUERIES[:1])], 5)
    assert isinstance(results["long"], fastsoft.FastsoftError) and "longer than the model's maximum" in str(results["long"])
    assert len(results["ok"][0]) == 1
    with pytest.raises(fastsoft.FastsoftError, match="longer than"):
        teach(tiny, template, "long", "word " * 3000, QUERIES[:1])


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_log_sum_exp_matches_its_reference(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 7, 16), torch.randn(3, 4, 7 if causal else 11, 16), torch.randn(3, 4, 7 if causal else 11, 16)
    out, lse = attention_mod.attention_lse(q, k, v, 0.3, causal)
    ref_out, ref_lse = attention_mod.attention_lse_reference(q, k, v, 0.3, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3), rtol=1e-5, atol=1e-5)


def test_teacher_reference_attention_path_gives_the_same_answers(tiny, monkeypatch):
    template = make_template(tiny.tokenizer)
    fused = teach_jobs(tiny, template, _requests()[:2], 5, token_budget=32, max_rows=2)
    monkeypatch.setattr(attention_mod, "LSE_FAILED", {("cpu", torch.float32)})
    slow = teach_jobs(tiny, template, _requests()[:2], 5, token_budget=32, max_rows=2)
    for job in fused:
        for a, b in zip(fused[job][0] + fused[job][1], slow[job][0] + slow[job][1]):
            assert a.answer == b.answer
            torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_teacher_matches_each_query_alone(tiny_model_dir, dtype):
    """On CUDA the teacher runs the fused kernels (flash for bf16, memory-efficient for fp32), never the fallback."""
    from fastsoft.models import load_model

    loaded = load_model(tiny_model_dir, dtype=dtype, device="cuda")
    template = make_template(loaded.tokenizer)
    requests = _requests()
    taught = teach_jobs(loaded, template, requests, 5, token_budget=24, max_rows=3, max_jobs=2)
    assert ("cuda", loaded.dtype) not in attention_mod.LSE_FAILED
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "fp32" else dict(rtol=0.05, atol=0.1)
    for request in requests:
        answers = request.answers or [None] * len(request.queries)
        for got, query, answer in zip(taught[request.id][0], request.queries, answers):
            ids, hidden = _run_alone(loaded, template, request.context, query, answer, 5)
            if dtype == "fp32":
                assert got.answer == ids
                torch.testing.assert_close(got.hidden, hidden, **tol)
            else:  # bf16: greedy paths may part after a near-tie; the first position and forced rows must agree
                n = len(ids) if answer is not None else 1
                torch.testing.assert_close(got.hidden[:n], hidden[:n], **tol)


# -- packed student steps -------------------------------------------------------------------------


def _fake_varlen(new_api: bool):
    """torch.nn.attention.varlen.varlen_attn stand-in for CPU (per-segment sdpa), in its 2.10 or later signature."""

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, gqa, scale):
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                                               is_causal=causal, enable_gqa=gqa, scale=scale)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    if new_api:
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):
            return run(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), enable_gqa, scale)
    else:
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            assert q.shape[1] == k.shape[1], "the 2.10 kernel has no GQA: key/value heads must be repeated"
            return run(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, False, None)
    return varlen_attn


ATTENTIONS = ["sdpa", "fastsoft_buckets", "fastsoft_varlen:new", "fastsoft_varlen:old"]


def _attention(name, monkeypatch):
    if not name.startswith(attention_mod.VARLEN_ATTENTION):
        return name
    monkeypatch.setattr(attention_mod, "_torch_varlen", lambda: _fake_varlen(name.endswith("new")))
    return attention_mod.VARLEN_ATTENTION


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_losses_and_gradients_equal_separate_runs(tiny, attention, monkeypatch):
    """Per-job losses and per-slot gradients of one packed step equal those of each segment run alone, and
    no gradient reaches a slot from another job's segments."""
    attention = _attention(attention, monkeypatch)
    torch.manual_seed(0)
    prompts = torch.randn(4, 3, 64, requires_grad=True)
    segs = [Segment(0, [5, 6], [7, 8, 9], [10, 11]), Segment(2, [5], [12, 13, 14, 15, 16], [14, 15, 16]), Segment(0, [5], [9], [8, 3]),
            Segment(3, [], [40, 41], [42])]
    job_of_row = torch.tensor([j for j, s in zip([0, 1, 0, 2], segs) for _ in s.answer])
    teacher = torch.log_softmax(torch.randn(len(job_of_row), tiny.vocab_size) * 3, -1)

    def job_losses(hidden, rows):
        per_row = softmax_kl(hidden, tiny.lm_weight, teacher[rows], reduction="none", backend="reference")
        return torch.zeros(3).index_add(0, job_of_row[rows], per_row)

    packed = job_losses(scored_hidden(tiny, prompts, pack(segs, 3), attention), torch.arange(len(job_of_row)))
    rows, alone = 0, torch.zeros(3)
    for seg in segs:
        n = len(seg.answer)
        alone = alone + job_losses(scored_hidden(tiny, prompts, pack([seg], 3), attention), torch.arange(rows, rows + n))
        rows += n
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    for job, slot in enumerate([0, 2, 3]):
        (g_packed,) = torch.autograd.grad(packed[job], prompts, retain_graph=True)
        (g_alone,) = torch.autograd.grad(alone[job], prompts, retain_graph=True)
        torch.testing.assert_close(g_packed, g_alone, rtol=1e-4, atol=1e-6)
        assert g_packed[slot].abs().sum() > 0
        others = [s for s in range(4) if s != slot]
        assert g_packed[others].abs().sum() == 0  # not a single bit from another job's segments (slot 1 is unused)


def test_packed_attention_choice(tiny):
    assert tiny.model.config._attn_implementation == "sdpa"
    assert attention_mod.packed_attention(tiny) == attention_mod.BUCKETS_ATTENTION  # CPU: sdpa per length bucket
    for name, match in ((attention_mod.VARLEN_ATTENTION, "cu_seq_lens"), (attention_mod.BUCKETS_ATTENTION, "length buckets")):
        with pytest.raises(RuntimeError, match=match):
            with attention_mod.attention_implementation(tiny, name):
                tiny.hidden_states(input_ids=torch.tensor([[5, 6, 7]]))
        assert tiny.model.config._attn_implementation == "sdpa"  # restored after the error


@pytest.mark.gpu
def test_gpu_packed_attention_matches_sdpa(tiny_model_dir):
    """The varlen backend chosen on CUDA gives sdpa's hidden states and prompt gradients (bf16)."""
    from fastsoft.models import load_model

    loaded = load_model(tiny_model_dir, dtype="bf16", device="cuda")
    choice = attention_mod.packed_attention(loaded)
    if choice not in attention_mod.VARLEN_ATTENTIONS:
        pytest.skip(f"no varlen attention in this install (packed steps use {choice})")
    torch.manual_seed(0)
    prompts = torch.randn(3, 4, 64, device="cuda", requires_grad=True)
    segs = [Segment(0, [5, 6], [7, 8, 9] * 9, [10, 11]), Segment(2, [5], [12, 13], [14, 15, 16]), Segment(None, [5], [7], [8])]
    fast = scored_hidden(loaded, prompts, pack(segs, 4))
    slow = scored_hidden(loaded, prompts, pack(segs, 4), attention="sdpa")
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0.05, atol=0.05)
    (g_fast,) = torch.autograd.grad(fast.float().square().sum(), prompts)
    (g_slow,) = torch.autograd.grad(slow.float().square().sum(), prompts)
    assert g_fast[1].abs().sum() == 0
    assert float((g_fast - g_slow).norm() / g_slow.norm()) < 0.05


# -- the scheduler ----------------------------------------------------------------------------------


def _runs(n):
    return [JobRun(Job(f"j{i}", "c", ["q"]), seed=i) for i in range(n)]


def test_a_job_arriving_while_every_slot_is_busy_waits_and_a_finished_one_frees_its_slot():
    scheduler = Scheduler(slots=2, token_budget=100)
    a, b, c, d = _runs(4)
    scheduler.submit(a)
    scheduler.submit(b)
    assert scheduler.admit() == [a, b] and (a.slot, b.slot) == (0, 1)
    scheduler.submit(c)  # arrives while every slot is busy
    assert scheduler.admit() == [] and c.state is State.WAITING and scheduler.counts()["waiting"] == 1
    scheduler.retire(a, State.DONE)
    scheduler.submit(d)
    assert scheduler.admit() == [c] and c.slot == 0 and c.state is State.TEACHING  # first come, first served
    assert d.state is State.WAITING and scheduler.free_slots() == []
    assert scheduler.counts() == {"waiting": 1, "training": 2, "done": 1, "failed": 0}


def test_best_fit_packing_takes_whole_minibatches_and_never_starves_a_job():
    scheduler = Scheduler(slots=4, token_budget=100)
    runs = _runs(4)
    for run in runs:
        scheduler.submit(run)
    scheduler.admit()
    for run in runs:
        run.state = State.TRAINING
    lengths = {0: [30, 30], 1: [50], 2: [40], 3: [20]}  # per slot: the packed lengths of the job's minibatch
    minibatches = {slot: list(range(len(v))) for slot, v in lengths.items()}
    seen = []
    for _ in range(6):
        chosen = scheduler.plan(minibatches, lengths)
        assert sum(sum(lengths[r.slot]) for r in chosen) <= 100 or len(chosen) == 1
        assert [r.slot for r in chosen] == sorted(r.slot for r in chosen)  # admission order
        seen.append([r.slot for r in chosen])
    # step 1: j0 (60) first, then best-fit decreasing in the 40 left: j2 (40) fits exactly
    assert seen[0] == [0, 2]
    assert {s for step in seen for s in step} == {0, 1, 2, 3}  # no job starves
    # a minibatch larger than the whole budget still runs, alone in its step
    lengths[1] = [250]
    for _ in range(4):
        chosen = scheduler.plan(minibatches, lengths)
        if any(r.slot == 1 for r in chosen):
            assert [r.slot for r in chosen] == [1]
            break
    else:
        raise AssertionError("the oversized job never ran")


# -- end to end: independence, waiting ------------------------------------------------------------

SMALL = dict(steps=3, prompt_length=3, max_new_tokens=2, lr=0.05, tol=0.0, batch_queries=2, eval_fraction=0.0, init="random",
             progress=False, seed=7)


def _jobs():
    base = CONTEXTS[0] + " " + CONTEXTS[1]
    return [Job(f"job{i}", base[i * 7 :] if i % 2 else base[::-1][i * 5 :], QUERIES[i % 2 :] + QUERIES[: i % 2])
            for i in range(4)]


def test_a_jobs_result_does_not_depend_on_its_neighbours(tiny, tmp_path):
    """Same seed, same σ (fp32, rtol 1e-4) whether a job runs alone or among others with slots=3 and a token
    budget that lets only two jobs' minibatches into a step (so jobs wait for slots and for steps)."""
    together_steps = []
    jobs = _jobs()
    reports = fastsoft.compress(jobs, tiny, tmp_path / "together", slots=3, token_budget=250,
                                on_step=lambda runs: together_steps.append([r.job.id for r in runs]), **SMALL)
    assert all("error" not in r for r in reports)
    assert max(len(s) for s in together_steps) == 2  # the budget never lets a third job in: jobs waited
    assert "job3" not in together_steps[0]  # the fourth job waited for a slot
    for job, report in zip(jobs, reports):
        alone = fastsoft.compress([job], tiny, tmp_path / f"alone-{job.id}", slots=1, **SMALL)[0]
        a = load_prompt(tmp_path / "together" / job.id)[0]
        b = load_prompt(tmp_path / f"alone-{job.id}" / job.id)[0]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert report["losses"] == pytest.approx(alone["losses"], rel=1e-4, abs=1e-6)


def test_a_waiting_job_starts_only_when_a_slot_frees(tiny, tmp_path):
    log = []
    jobs = _jobs()[:3]
    fastsoft.compress(jobs, tiny, tmp_path, slots=2, on_step=lambda runs: log.append([r.job.id for r in runs]), **SMALL)
    first = {j.id: next(i for i, s in enumerate(log) if j.id in s) for j in jobs}
    last = {j.id: max(i for i, s in enumerate(log) if j.id in s) for j in jobs}
    assert first["job0"] == first["job1"] == 0
    assert first["job2"] > min(last["job0"], last["job1"])  # it waited for a slot to free


# -- the end-to-end benchmark's CPU variant -------------------------------------------------------


def test_bench_e2e_cpu_small_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "benchmarks" / "bench_e2e.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu-small", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("e2e-*.json")
    result = json.loads(path.read_text())
    assert result["variant"] == "cpu-small" and result["device"]
    teacher = result["teacher"]
    assert {"context_tokens", "queries", "rows", "speedup", "target"} <= set(teacher)
    assert {r["method"] for r in teacher["rows"]} >= {"naive per query", "fastsoft shared context"}
    assert all(r["seconds"] > 0 for r in teacher["rows"])
    assert teacher["max_abs_diff"] < 1e-3  # the same hidden states as the naive teacher (fp32)
    training = result["training"]
    assert {"rows", "speedup", "target", "curves"} <= set(training)
    methods = {r["method"] for r in training["rows"]}
    assert "fastsoft, 1 job" in methods and "peft prompt tuning" in methods
    assert all(r["scored_tokens_per_s"] > 0 for r in training["rows"])
    curves = training["curves"]
    assert len(curves["fastsoft, 1 job"]) == len(curves["peft prompt tuning"]) > 1
    # same data, same batches, same init, same Adam: the two losses follow the same trajectory
    assert curves["fastsoft, 1 job"] == pytest.approx(curves["peft prompt tuning"], rel=1e-3)
    assert path.with_suffix(".png").exists()


_GRADIENT_BYTES = """
import hashlib, sys, torch
from fastsoft.models import load_model
from fastsoft.train.packing import Segment, pack, scored_hidden
tiny = load_model(sys.argv[1])
torch.manual_seed(0)
prompts = torch.randn(2, 16, 64, requires_grad=True)  # 64 segments share slot 0: σ's rows gathered 64 times each
segments = [Segment(i % 2, [5, 6 + i % 7], [7, 8, 9 + i % 5] * (1 + i % 3), [10, 11]) for i in range(64)]
hidden = scored_hidden(tiny, prompts, pack(segments, 16))
(hidden * torch.randn_like(hidden)).sum().backward()
print(hashlib.sha256(prompts.grad.numpy().tobytes()).hexdigest())
"""


def test_student_gradient_is_bit_identical_across_processes(tiny_model_dir):
    """No op in the packed step accumulates in thread-dependent order (CPU advanced-indexing backward adds
    with atomics, so a seeded run once drifted from 1e-7 at step 2 to 0.015 of gap_closed at step 200)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    digests = {subprocess.run([sys.executable, "-c", _GRADIENT_BYTES, str(tiny_model_dir)], env=env, capture_output=True, text=True,
                              check=True, timeout=300).stdout.strip() for _ in range(3)}
    assert len(digests) == 1, digests
