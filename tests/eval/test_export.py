"""PEFT export: a first-placement export loads in PEFT with identical logits."""

from __future__ import annotations

import json

import torch

import fastsoft
from fastsoft.io.export import load_prompt
from fastsoft.train.packing import Segment, pack, scored_hidden

TRAIN = dict(steps=12, prompt_length=4, max_new_tokens=5, lr=0.05, tol=0.0, batch_queries=5, progress=False)


def test_peft_loads_a_first_placement_export_with_identical_logits(tiny, tiny_model_dir, tiny_job, tmp_path):
    from peft import PeftModel

    from fastsoft.models import load_model

    fastsoft.compress([tiny_job], tiny, tmp_path, placement="first", **TRAIN)
    prompt, template, meta = load_prompt(tmp_path / tiny_job.id)
    assert meta["placement"] == "first" and meta["peft_equivalent"]
    config = json.loads((tmp_path / tiny_job.id / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4 and config["token_dim"] == 64
    before, after = template.split("Who is the mayor?")
    ids = tiny.tokenizer(before + after, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ours = tiny.logits(scored_hidden(tiny, prompt[None], pack([Segment(0, [], [], ids[0].tolist() + [0])], 4)))[-1]
    peft_model = PeftModel.from_pretrained(
        load_model(tiny_model_dir).model, tmp_path / tiny_job.id
    )  # PEFT wraps it: a copy
    theirs = peft_model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
