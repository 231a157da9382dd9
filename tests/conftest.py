"""Shared fixtures: a tiny random-init Llama with its own small tokenizer, saved as a Hugging Face folder.

Nothing is downloaded. One real-model test uses the embedded SmolLM2 (marked ``real_model``).
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "real_model: loads the embedded SmolLM2-135M-Instruct (about 40 s)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run benchmarks/gpu_run.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The harbour town of Velmora paints every door teal and holds a lantern festival each spring.",
    "Its mayor, Odile Varsk, keeps seventeen goats and a blue bicycle named Comet.",
    "What colour are the doors? Who is the mayor? How many goats? When is the festival?",
    "Answer briefly. The doors are teal. The mayor is Odile Varsk. Seventeen goats.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper random model: its greedy answers depend on the context
        model.model.embed_tokens.weight.mul_(3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (H=64, 2 layers, ~400-token vocab) saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from fastsoft.frozen.loading import load_model

    return load_model(tiny_model_dir)


@pytest.fixture
def tiny_job():
    from fastsoft.data.jobs import Job

    return Job(
        id="velmora",
        context=" ".join(CORPUS[:2]) * 2,
        queries=[
            "What colour are the doors?",
            "Who is the mayor?",
            "How many goats?",
            "When is the festival?",
            "What is the bicycle called?",
        ],
        eval_queries=["Which colour are the doors?", "Name the mayor."],
    )


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory):
    """The tiny Llama with five end tokens (``<|im_end|>``, "?", ".", " the", "s"): its sampled text ends now and
    then, so self-study keeps some of what it writes (with ``synthesis_temperature`` high)."""
    folder = tmp_path_factory.mktemp("chatty-llama")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id] + [
        tokenizer.convert_tokens_to_ids(t) for t in ["?", ".", "Ġthe", "s"]
    ]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chatty(chatty_model_dir):
    from fastsoft.frozen.loading import load_model

    return load_model(chatty_model_dir)


# Self-study settings under which the chatty model keeps a share of what it writes (tests only)
CHATTY = {"synthesis_temperature": 3.0, "synthesis_top_p": 1.0}
