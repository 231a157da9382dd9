"""Generation with a saved prompt, and ROUGE-L."""

from __future__ import annotations

import warnings

import pytest

import fastsoft
from fastsoft.eval.generate import generate
from fastsoft.eval.metrics import rouge_l
from fastsoft.io.export import load_prompt

TRAIN = dict(steps=12, prompt_length=4, max_new_tokens=5, lr=0.05, tol=0.0, batch_queries=5, progress=False)


def test_generate_with_a_saved_prompt(tiny, tiny_job, tmp_path):
    fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)
    prompt, template, _ = load_prompt(tmp_path / tiny_job.id)
    text = generate(tiny, template, prompt, "Who is the mayor?", max_new_tokens=5)
    assert isinstance(text, str) and text == generate(tiny, template, prompt, "Who is the mayor?", max_new_tokens=5)


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
