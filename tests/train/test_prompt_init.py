"""Initial soft prompts."""

from __future__ import annotations

import pytest
import torch

from fastsoft.errors import FastsoftError
from fastsoft.train.prompt_init import init_prompt


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
