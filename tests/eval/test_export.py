"""PEFT export: a first-placement export loads in PEFT with identical logits; a NaN prompt is never written nor used."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import fastsoft
from fastsoft.cli import main
from fastsoft.data.templates import Template
from fastsoft.errors import FastsoftError
from fastsoft.frozen.packing import Segment, pack, scored_hidden
from fastsoft.io.export import ADAPTER_WEIGHTS, load_prompt, save_prompt

TRAIN = dict(steps=12, prompt_length=4, max_new_tokens=5, lr=0.05, tol=0.0, batch_queries=5, progress=False)


def test_peft_loads_a_first_placement_export_with_identical_logits(tiny, tiny_model_dir, tiny_job, tmp_path):
    from peft import PeftModel

    from fastsoft.frozen.loading import load_model

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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_prompt_is_never_exported(tmp_path, bad):
    prompt = torch.zeros(4, 8)
    prompt[1, 2] = bad
    template = Template("<s>", "", "", "first", "plain")
    with pytest.raises(FastsoftError, match="holds NaN or infinite values, so it was not exported"):
        save_prompt(tmp_path / "job", prompt, model_path="m", model_fingerprint="f", template=template)
    assert not (tmp_path / "job").exists()  # nothing half-exported
    save_prompt(tmp_path / "job", prompt.nan_to_num(0, 0, 0), model_path="m", model_fingerprint="f", template=template)
    assert load_prompt(tmp_path / "job")[0].isfinite().all()


def test_generate_refuses_a_nan_prompt_in_one_sentence(tmp_path, tiny_model_dir, capsys):
    """It used to answer with an empty string and exit 0."""
    (tmp_path / "p").mkdir()
    save_file({"prompt_embeddings": torch.full((4, 64), float("nan"))}, str(tmp_path / "p" / ADAPTER_WEIGHTS))
    with pytest.raises(FastsoftError, match="holds NaN or infinite values, so it answers nothing"):
        load_prompt(tmp_path / "p")
    argv = ["generate", "--prompt", str(tmp_path / "p"), "--query", "Who is the mayor?", "--model", str(tiny_model_dir)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastsoft: error: ") and "NaN or infinite" in err[0]
    assert captured.out == ""
