"""Packed student steps, the engine's training loop, evaluation, PEFT export and generation."""

from __future__ import annotations

import json

import pytest
import torch

import fastsoft
from fastsoft.io.export import load_prompt
from fastsoft.eval.generate import generate
from fastsoft.eval.metrics import rouge_l
from fastsoft.train.packing import Segment, pack, scored_hidden

TRAIN = dict(steps=12, prompt_length=4, max_new_tokens=5, lr=0.05, tol=0.0, batch_queries=5, progress=False)


def test_packed_rows_need_use_cache_false(tiny):
    """Regression: with transformers' default cache, packed segments attend to each other."""
    a, b = torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 6))
    alone = tiny.model(b).logits
    ids = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    leaky = tiny.model(input_ids=ids, position_ids=positions).logits[:, 9:]
    assert (leaky - alone).abs().max() > 1e-3  # the hazard is real in this transformers version
    sealed = tiny.lm_weight @ tiny.hidden_states(input_ids=ids, position_ids=positions)[0, 9:].T
    torch.testing.assert_close(sealed.T, alone[0], rtol=1e-4, atol=1e-5)


def test_packed_step_equals_separate_runs_and_isolates_slots(tiny):
    torch.manual_seed(0)
    prompts = torch.randn(3, 4, 64, requires_grad=True)
    segs = [Segment(0, [5, 6], [7, 8, 9], [10, 11]), Segment(2, [5], [12, 13], [14, 15, 16]), Segment(None, [5], [7], [8])]
    hidden = scored_hidden(tiny, prompts, pack(segs, 4))
    assert hidden.shape == (6, 64)
    separate = torch.cat([scored_hidden(tiny, prompts, pack([s], 4)) for s in segs])
    torch.testing.assert_close(hidden, separate, rtol=1e-4, atol=1e-5)
    # gradients of segment 0's rows reach slot 0 only; slot 1 (unused) gets none
    (g0,) = torch.autograd.grad(hidden[:2].sum(), prompts, retain_graph=True)
    assert g0[0].abs().sum() > 0 and g0[1:].abs().sum() == 0
    (g1,) = torch.autograd.grad(hidden[2:5].sum(), prompts)
    assert g1[2].abs().sum() > 0 and g1[:2].abs().sum() == 0


def test_only_sigma_trains_and_loss_falls(tiny, tiny_job, tmp_path):
    report = fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)[0]
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    assert report["steps"] == 12 and report["stop_reason"] == "step budget"
    losses = report["losses"]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    for key in ("kl_soft", "kl_none", "gap_closed", "top1_agreement", "exact_match", "rouge_l", "compression_ratio", "seconds"):
        assert key in report
    assert report["kl_soft"] < report["kl_none"]
    assert report["compression_ratio"] == report["context_tokens"] / 4
    folder = tmp_path / tiny_job.id
    assert {"adapter_model.safetensors", "adapter_config.json", "fastsoft.json", "report.json", "loss.png"} <= {p.name for p in folder.iterdir()}


def test_seeded_runs_are_reproducible(tiny, tiny_job, tmp_path):
    a = fastsoft.compress([tiny_job], tiny, tmp_path / "a", seed=3, init="random", **TRAIN)[0]
    b = fastsoft.compress([tiny_job], tiny, tmp_path / "b", seed=3, init="random", **TRAIN)[0]
    fastsoft.compress([tiny_job], tiny, tmp_path / "c", seed=4, init="random", **TRAIN)[0]
    pa, pb, pc = (load_prompt(tmp_path / x / tiny_job.id)[0] for x in "abc")
    assert torch.equal(pa, pb) and a["losses"] == b["losses"]
    assert not torch.equal(pa, pc)


@pytest.mark.parametrize("objective,teacher", [("answer", "dense"), ("kl:0.5,answer:0.5", "topk"), ("kl", "sampled"), ("kl", "hidden")])
def test_objectives_and_teacher_kinds_train(tiny, tiny_job, tmp_path, objective, teacher):
    report = fastsoft.compress([tiny_job], tiny, tmp_path, objective=objective, teacher=teacher, **TRAIN)[0]
    assert report["losses"][-1] < report["losses"][0]


def test_supervised_needs_answers(tiny, tiny_job, tmp_path):
    with pytest.raises(fastsoft.FastsoftError, match="no answers"):
        fastsoft.compress([tiny_job], tiny, tmp_path, objective="supervised", **TRAIN)
    tiny_job.answers = ["teal", "Odile Varsk", "seventeen", "spring", "Comet"]
    report = fastsoft.compress([tiny_job], tiny, tmp_path, objective="supervised", **TRAIN)[0]
    assert report["losses"][-1] < report["losses"][0]


def test_convergence_stops_early(tiny, tiny_job, tmp_path):
    report = fastsoft.compress([tiny_job], tiny, tmp_path, **{**TRAIN, "tol": 1e9, "patience": 2})[0]
    assert report["steps"] == 2 and report["stop_reason"] == "converged"


def test_several_jobs_share_slots_and_a_failing_job_does_not_stop_the_others(tiny, tiny_job, tmp_path):
    short = fastsoft.Job("short", "tiny", ["What?"])
    other = fastsoft.Job("other", tiny_job.context[::-1], tiny_job.queries, eval_queries=["Which?"])
    reports = fastsoft.compress([tiny_job, short, other], tiny, tmp_path, slots=2, **TRAIN)
    assert [r["job_id"] for r in reports] == ["velmora", "short", "other"]
    assert "larger than the context" in reports[1]["error"]
    assert reports[0]["steps"] == reports[2]["steps"] == 12
    assert (tmp_path / "short" / "error.json").exists()


def test_finished_exports_are_not_overwritten(tiny, tiny_job, tmp_path):
    fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)
    with pytest.raises(fastsoft.FastsoftError, match="--overwrite"):
        fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)
    fastsoft.compress([tiny_job], tiny, tmp_path, overwrite=True, **TRAIN)


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
    peft_model = PeftModel.from_pretrained(load_model(tiny_model_dir).model, tmp_path / tiny_job.id)  # PEFT wraps it: a copy
    theirs = peft_model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def test_generate_with_a_saved_prompt(tiny, tiny_job, tmp_path):
    fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)
    prompt, template, _ = load_prompt(tmp_path / tiny_job.id)
    text = generate(tiny, template, prompt, "Who is the mayor?", max_new_tokens=5)
    assert isinstance(text, str) and text == generate(tiny, template, prompt, "Who is the mayor?", max_new_tokens=5)


def test_rouge_l():
    assert rouge_l("the doors are teal", "the doors are teal") == 1.0
    assert rouge_l("teal doors", "the doors are teal") == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert rouge_l("", "x") == 0.0


def test_the_readme_python_examples_run_as_written(tiny, tiny_job, tmp_path, monkeypatch, capsys):
    """Both README code blocks, verbatim; the default model is swapped for the tiny one (no real weights in this test)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    api, loss = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[:2]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text(tiny_job.context)
    monkeypatch.setattr(fastsoft, "load_model", lambda *args, **kwargs: tiny)
    scope = {}
    exec(api, scope)
    assert "error" not in scope["reports"][0] and scope["reports"][0]["steps"] >= 1
    answer = fastsoft.generate(tiny, scope["template"], scope["prompt"], "Who founded it?")
    assert isinstance(answer, str) and capsys.readouterr().out == answer + "\n"

    gen = torch.Generator().manual_seed(0)
    n, k = 5, 4
    scope = {"hidden": torch.randn(n, 64, generator=gen, requires_grad=True), "lm_head": torch.nn.Linear(64, tiny.vocab_size, bias=False),
             "teacher_logprobs": torch.log_softmax(torch.randn(n, tiny.vocab_size, generator=gen), -1),
             "ids": torch.randint(0, tiny.vocab_size, (n, k), generator=gen), "probs": torch.full((n, k), 0.2), "tail": torch.full((n,), 0.2),
             "labels": torch.randint(0, tiny.vocab_size, (n,), generator=gen), "teacher_hidden": torch.randn(n, 64, generator=gen)}
    exec(loss, scope)
    assert scope["loss"].ndim == 0 and torch.isfinite(scope["loss"]) and "LigerFusedLinearKLDivLoss" in scope
