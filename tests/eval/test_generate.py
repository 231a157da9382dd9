"""Generation with a saved prompt (with and without the shared frozen prefix), and ROUGE-L."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastsoft
from fastsoft.data.templates import make_template, tokenize_query
from fastsoft.eval.evaluate import token_kl
from fastsoft.eval.generate import generate, generate_ids
from fastsoft.eval.metrics import rouge_l
from fastsoft.io.export import load_prompt
from fastsoft.teacher.batching import Taught

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
