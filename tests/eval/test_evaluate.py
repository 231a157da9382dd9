"""Held-out evaluation streams over the queries: chunked, it gives the metrics of one chunk, and what it builds at a
time (packed rows, logits blocks, decoding batches) is bounded whatever the number of queries (issue #27)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import fastsoft.eval.evaluate as evaluate_module
from fastsoft.data.templates import make_template, tokenize_query
from fastsoft.eval.evaluate import evaluate, query_chunks, token_kl
from fastsoft.frozen.packing import Segment
from fastsoft.teacher.batching import Taught

QUERIES = ["Goats?", "Who is the mayor?", "What colour are the doors of the harbour town?", "When is the festival?"]
WHOLE = 10**9  # a token budget and a logits block no test reaches: one chunk, one block, as before issue #27


def held_out(loaded, count: int, seed: int = 0) -> list[Taught]:
    """``count`` queries of different lengths with 1-5 random answer ids and random teacher hidden states."""
    template, generator = make_template(loaded.tokenizer), torch.Generator().manual_seed(seed)
    queries = []
    for i in range(count):
        before, after = tokenize_query(loaded.tokenizer, template, QUERIES[i % 4] + " Again?" * (i % 3))
        n = 1 + i % 5
        answer = torch.randint(3, len(loaded.tokenizer), (n,), generator=generator).tolist()
        queries.append(Taught(before, after, answer, torch.randn(n, loaded.hidden_size, generator=generator)))
    return queries


@contextmanager
def recorded(loaded):
    """What each call builds: rows of every ``loaded.logits`` call, tokens of every packed student row, rows of every
    decoding batch (the decoder's inputs; a packed row runs with ``use_cache=False``)."""
    seen = {"logit_rows": [], "packed_tokens": [], "batch_rows": []}
    logits = loaded.logits

    def hook(module, args, kwargs):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        if kwargs.get("use_cache") is False:
            seen["packed_tokens"].append(inputs.shape[0] * inputs.shape[1])
        else:
            seen["batch_rows"].append(inputs.shape[0])

    loaded.logits = lambda hidden: seen["logit_rows"].append(hidden[..., 0].numel()) or logits(hidden)
    handle = loaded.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
        del loaded.logits  # the method again


@pytest.mark.parametrize("share_prefix", [True, False])
def test_chunked_token_kl_equals_one_chunk(tiny, share_prefix):
    """Queries in several chunks and logits in several blocks: each token's KL as with one chunk up to rounding (the
    student's GEMMs see other shapes), the same argmaxes, the same metrics."""
    torch.manual_seed(0)
    prompt = 0.5 * torch.randn(4, tiny.hidden_size)
    queries = held_out(tiny, 12)
    assert len(query_chunks([Segment(0, q.before, q.after, q.answer) for q in queries], 4, 80)) >= 4
    for p in (prompt, None):
        one = token_kl(tiny, p, queries, share_prefix=share_prefix, token_budget=WHOLE, logit_rows=WHOLE)
        chunked = token_kl(tiny, p, queries, share_prefix=share_prefix, token_budget=80, logit_rows=5)
        assert len(chunked[0]) == sum(len(q.answer) for q in queries) and len(set(chunked[0].tolist())) > 10
        torch.testing.assert_close(chunked[0], one[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(chunked[1], one[1]) and torch.equal(chunked[2], one[2])
    whole = evaluate(tiny, prompt, queries, 100, max_new_tokens=4, share_prefix=share_prefix, token_budget=WHOLE)
    parts = evaluate(tiny, prompt, queries, 100, max_new_tokens=4, share_prefix=share_prefix, token_budget=80)
    assert parts.pop("samples") == whole.pop("samples")
    assert parts == pytest.approx(whole, rel=1e-5)


def test_query_chunks_keep_the_order_within_the_budget():
    segments = [Segment(0, [1] * b, [2], [3]) for b in (3, 9, 1, 1, 1, 2)]  # lengths with P = 1: 6, 12, 4, 4, 4, 5
    chunks = query_chunks(segments, 1, 8)
    assert chunks == [slice(0, 1), slice(1, 2), slice(2, 4), slice(4, 5), slice(5, 6)]  # the 12-token one alone
    assert query_chunks(segments, 1, WHOLE) == [slice(0, 6)] and query_chunks([], 1, 8) == []


def test_evaluation_memory_does_not_grow_with_the_number_of_queries(tiny, monkeypatch):
    """8 or 64 queries: no logits block over its row limit, no packed row over the token budget, no decoding batch
    over its row limit. Before, the 64 queries' logits were one [N, V] block and their answers one batch of 64."""
    monkeypatch.setattr(evaluate_module, "LOGIT_BYTES", 4 * tiny.vocab_size * 6)  # blocks of 6 rows
    prompt = 0.5 * torch.randn(4, tiny.hidden_size)
    peaks = {}
    for count in (8, 64):
        queries = held_out(tiny, count)
        with recorded(tiny) as seen:
            report = evaluate(tiny, prompt, queries, 100, max_new_tokens=3, token_budget=100, batch_rows=4)
        assert report["eval_queries"] == count
        peaks[count] = {what: max(sizes) for what, sizes in seen.items()}
    assert peaks[8]["logit_rows"] == peaks[64]["logit_rows"] == 6
    assert peaks[64]["packed_tokens"] <= 100 and peaks[64]["batch_rows"] == peaks[8]["batch_rows"] == 4
