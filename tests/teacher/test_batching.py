"""The continuous-batching teacher: shared context, equal to each query run alone; its attention with log-sum-exp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsoft
import fastsoft.frozen.attention as attention_mod
from fastsoft.data.jobs import Job
from fastsoft.data.templates import encode, end_token_ids, make_template, tokenize_query
from fastsoft.frozen.loading import load_model
from fastsoft.teacher.batching import teach, teach_jobs


def _requests():
    return [
        Job("greedy", CONTEXTS[0], QUERIES, None, ["Name the mayor."]),
        Job("forced", CONTEXTS[1], QUERIES[:3], ["teal", "Odile Varsk", "seventeen goats and Comet"], QUERIES[3:]),
        Job("short", CONTEXTS[2], QUERIES[::-1]),
    ]


QUERIES = [
    "What colour are the doors?",
    "Who?",
    "How many goats does the mayor keep, and what is the bicycle named?",
    "When is the festival?",
]


CONTEXTS = [
    "The harbour town of Velmora paints every door teal and holds a lantern festival each spring.",
    "Its mayor, Odile Varsk, keeps seventeen goats and a blue bicycle named Comet. " * 3,
    "Velmora",
]


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
        return ids, loaded.hidden_states(input_ids=torch.tensor([prompt + ids], device=loaded.device))[
            0, len(prompt) - 1 : -1
        ].float()
    ids, states = [], []
    while True:
        state = loaded.hidden_states(input_ids=torch.tensor([prompt + ids], device=loaded.device))[0, -1].float()
        ids.append(int(loaded.logits(state).argmax()))
        states.append(state)
        if ids[-1] in ends or len(ids) >= max_new_tokens:
            return ids, torch.stack(states)


_REFERENCE: dict = {}


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
        for got, query, answer in [
            *zip(train, request.queries, answers),
            *((t, q, None) for t, q in zip(held, request.eval_queries)),
        ]:
            ids, hidden = _alone(tiny, template, request.context, query, answer)
            assert got.answer == ids
            assert got.hidden.dtype == torch.float32 and got.hidden.shape == (len(ids), tiny.hidden_size)
            torch.testing.assert_close(got.hidden, hidden, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                torch.log_softmax(tiny.logits(got.hidden), -1),
                torch.log_softmax(tiny.logits(hidden), -1),
                rtol=1e-4,
                atol=1e-5,
            )


def test_teach_single_job_api_and_errors(tiny):
    template = make_template(tiny.tokenizer)
    single = teach(tiny, template, "one", CONTEXTS[0], QUERIES[:2], max_new_tokens=5, batch_size=1)
    together = teach_jobs(tiny, template, [Job("one", CONTEXTS[0], QUERIES[:2]), Job("two", CONTEXTS[1], QUERIES)], 5)
    for a, b in zip(single, together["one"][0]):
        assert a.answer == b.answer and a.before == b.before and a.after == b.after
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-6)
    # a job too long for the model fails alone; the others are taught
    results = teach_jobs(
        tiny, template, [Job("long", "word " * 3000, QUERIES[:1]), Job("ok", CONTEXTS[2], QUERIES[:1])], 5
    )
    assert isinstance(results["long"], fastsoft.FastsoftError) and "longer than the model's maximum" in str(
        results["long"]
    )
    assert len(results["ok"][0]) == 1
    with pytest.raises(fastsoft.FastsoftError, match="longer than"):
        teach(tiny, template, "long", "word " * 3000, QUERIES[:1])


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_log_sum_exp_matches_its_reference(causal):
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(3, 4, 7, 16),
        torch.randn(3, 4, 7 if causal else 11, 16),
        torch.randn(3, 4, 7 if causal else 11, 16),
    )
    out, lse = attention_mod.attention_lse(q, k, v, 0.3, causal)
    ref_out, ref_lse = attention_mod.attention_lse_reference(q, k, v, 0.3, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3), rtol=1e-5, atol=1e-5
    )


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


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked: the nucleus within the top 256; flat: the full sort
def test_sampling_draws_from_the_nucleus_of_a_full_sort(scale):
    """``_sample`` takes the nucleus from the top 256 tokens when they reach top_p: the same token, for the same
    generator, as sorting the whole vocabulary."""
    from fastsoft.teacher.batching import Sampling, _sample

    def full_sort(logits, sampling, generator):
        probs = torch.softmax(logits.double() / sampling.temperature, -1)
        sorted_probs, order = probs.sort(descending=True)
        keep = int((sorted_probs.cumsum(0) < sampling.top_p).sum()) + 1
        nucleus = sorted_probs[:keep]
        return int(order[torch.multinomial(nucleus / nucleus.sum(), 1, generator=generator)])

    gen = torch.Generator().manual_seed(0)
    for top_p in (0.5, 0.95, 1.0):
        sampling = Sampling(temperature=0.6, top_p=top_p, seeds={})
        for seed in range(20):
            logits = torch.randn(4096, generator=gen) * scale
            top = torch.softmax(logits.double() / 0.6, -1).topk(256).values.sum()
            if top_p < 1:  # the path this case means to take
                assert bool(top >= top_p) == (scale > 1)
            got = _sample(logits, sampling, torch.Generator().manual_seed(seed))
            assert got == full_sort(logits, sampling, torch.Generator().manual_seed(seed))
