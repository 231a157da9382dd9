"""Generation with a saved prompt (with and without the shared frozen prefix), and ROUGE-L."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastsoft
from fastsoft.data.templates import make_template, tokenize_query
from fastsoft.eval.evaluate import token_kl
from fastsoft.eval.generate import BATCH_ROWS, generate, generate_batch_ids, generate_ids
from fastsoft.frozen.loading import load_model
from fastsoft.io.export import load_prompt
from fastsoft.teacher.batching import Taught
from fastsoft.text import rouge_l

TRAIN = dict(steps=12, prompt_length=4, max_new_tokens=5, lr=0.05, tol=0.0, batch_queries=5, progress=False)


def test_generate_with_a_saved_prompt(tiny, tiny_job, tmp_path):
    fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)
    prompt, template, _ = load_prompt(tmp_path / tiny_job.id)
    text = generate(tiny, template, prompt, "Who is the mayor?", max_new_tokens=5)
    assert isinstance(text, str) and text == generate(tiny, template, prompt, "Who is the mayor?", max_new_tokens=5)


def test_shared_prefix_generates_and_scores_the_same(tiny, tiny_job):
    """Generation continuing from the head's cached keys and values, and teacher-forced KL with the head shared,
    equal running the head every time."""
    torch.manual_seed(0)
    prompt = torch.randn(4, tiny.hidden_size)
    before, after = tokenize_query(tiny.tokenizer, make_template(tiny.tokenizer), "Who is the mayor?")
    assert before  # the chat template has a head before the context
    for p in (prompt, None):
        assert generate_ids(tiny, p, before, after, 12, share_prefix=True) == generate_ids(
            tiny, p, before, after, 12, share_prefix=False
        )
    queries = [
        Taught(before, after, [40, 41, 42], torch.randn(3, tiny.hidden_size)),
        Taught(before, after[:-1], [43], torch.randn(1, tiny.hidden_size)),
    ]
    for p in (prompt, None):
        shared, whole = token_kl(tiny, p, queries, share_prefix=True), token_kl(tiny, p, queries, share_prefix=False)
        torch.testing.assert_close(shared[0], whole[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(shared[1], whole[1])


QUERIES = [
    "Goats?",
    "Who is the mayor?",
    "What colour are the doors of the harbour town?",
    "When is the lantern festival held each spring?",
]


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """The tiny Llama with larger random weights: ``tiny`` answers one token over and over whatever it reads, this
    one's greedy answers change with the row and the step, so padding or position mistakes change the ids."""
    from conftest import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("lively-llama")
    tokenizer = build_tokenizer()
    build_model(tokenizer, initializer_range=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(folder)


def greedy_without_cache(loaded, prompt, before, after, steps):
    """Reference: the whole sequence through the model again at every step, no cache, no padding."""
    embed = lambda ids: loaded.embed(torch.tensor(ids, dtype=torch.long))
    context = [embed(before)] + ([] if prompt is None else [prompt]) + [embed(after)]
    answer = []
    for _ in range(steps):
        hidden = loaded.hidden_states(inputs_embeds=torch.cat(context + [embed(answer)])[None])
        answer.append(int(loaded.logits(hidden[0, -1]).argmax()))
    return answer


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("with_prompt", [True, False])
def test_batched_generation_equals_one_by_one(lively, share_prefix, with_prompt):
    """Rows of different lengths decoded together (left-padded, from one shared head or not) give each row's own
    greedy ids, which are also what the model gives without any cache."""
    torch.manual_seed(0)
    prompt = 0.1 * torch.randn(4, lively.hidden_size) if with_prompt else None
    rows = [tokenize_query(lively.tokenizer, make_template(lively.tokenizer), q) for q in QUERIES]
    assert len({len(after) for _, after in rows}) == len(rows)
    alone = [generate_ids(lively, prompt, before, after, 10, share_prefix) for before, after in rows]
    assert len({tuple(a) for a in alone}) == len(rows)  # the rows' answers differ: a mix-up would show
    assert generate_batch_ids(lively, prompt, rows, 10, share_prefix) == alone
    assert alone == [greedy_without_cache(lively, prompt, before, after, 10) for before, after in rows]
    # rows with different heads (no shared prefix possible) and a single row
    mixed = [(before[i:], after) for i, (before, after) in enumerate(rows)]
    assert generate_batch_ids(lively, prompt, mixed, 10, share_prefix) == [
        generate_ids(lively, prompt, before, after, 10, share_prefix) for before, after in mixed
    ]
    assert generate_batch_ids(lively, prompt, rows[:1], 10, share_prefix) == alone[:1]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_batched_rows_stop_at_their_own_end_tokens(lively, monkeypatch, share_prefix):
    """Rows that end early leave the batch; the others go on, with the same ids as alone."""
    torch.manual_seed(0)
    prompt = 0.1 * torch.randn(4, lively.hidden_size)
    rows = [tokenize_query(lively.tokenizer, make_template(lively.tokenizer), q) for q in QUERIES]
    free = generate_batch_ids(lively, prompt, rows, 10, share_prefix)
    monkeypatch.setattr(lively.model.generation_config, "eos_token_id", [free[0][1], free[2][5]])
    alone = [generate_ids(lively, prompt, before, after, 10, share_prefix) for before, after in rows]
    lengths = [len(a) for a in alone]
    assert len(set(lengths)) >= 3 and 10 in lengths  # rows stop at different steps, some only at the limit
    assert generate_batch_ids(lively, prompt, rows, 10, share_prefix) == alone
    assert generate_batch_ids(lively, prompt, rows, 0, share_prefix) == [[]] * len(rows)


def decoded_batches(loaded):
    """Records the rows of every decoder call (the first step of a batch and each step after it)."""
    rows = []
    hook = lambda module, args, kwargs: rows.append(
        (kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[0]
    )
    return rows, loaded.decoder.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_greedy_decodes_in_bounded_batches_with_the_same_answers(lively, share_prefix):
    """Many rows go through in batches of at most ``batch_rows`` (the KV cache is bounded whatever the number of
    rows), with each row's answer as alone: a batch of rows with one head and one of mixed heads alike."""
    torch.manual_seed(0)
    prompt = 0.1 * torch.randn(4, lively.hidden_size)
    rows = [tokenize_query(lively.tokenizer, make_template(lively.tokenizer), q) for q in QUERIES]
    rows += [(before[i:], after) for i, (before, after) in enumerate(rows[1:], 1)]  # 7 rows, 4 heads
    alone = [generate_ids(lively, prompt, before, after, 8, share_prefix) for before, after in rows]
    assert len({tuple(a) for a in alone}) >= 4
    for batch_rows in (1, 3, len(rows)):
        sizes, handle = decoded_batches(lively)
        try:
            assert generate_batch_ids(lively, prompt, rows, 8, share_prefix, batch_rows=batch_rows) == alone
        finally:
            handle.remove()
        assert max(sizes) == batch_rows
    sizes, handle = decoded_batches(lively)
    try:  # the default bound: 40 rows are two batches
        assert generate_batch_ids(lively, prompt, rows[:4] * 10, 2, share_prefix) == [a[:2] for a in alone[:4]] * 10
    finally:
        handle.remove()
    assert max(sizes) == BATCH_ROWS < 40


def test_no_deprecation_warning_from_our_own_calls(tiny, tiny_job, tmp_path):
    """A whole compress + generate with deprecation warnings raised as errors (transformers renames keywords, e.g.
    ``past_key_values`` -> ``cache`` in 5.24, removed in 5.40: a warning today is a break tomorrow)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)
        prompt, template, _ = load_prompt(tmp_path / tiny_job.id)
        generate(tiny, template, prompt, "Who is the mayor?", max_new_tokens=5)


def test_rouge_l():
    assert rouge_l("the doors are teal", "the doors are teal") == 1.0
    assert rouge_l("teal doors", "the doors are teal") == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert rouge_l("", "x") == 0.0
