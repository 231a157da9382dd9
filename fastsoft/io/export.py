"""Saving soft prompts in PEFT's prompt-tuning format (plus what fastsoft needs to use them again).

``adapter_model.safetensors`` holds ``prompt_embeddings [P, H]``; ``adapter_config.json`` is a PEFT
``PROMPT_TUNING`` config; ``fastsoft.json`` records the placement and the template, because PEFT
always puts the virtual tokens at position 0: only a ``placement="first"`` export behaves identically
under ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastsoft.data.templates import Template
from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import atomic_write, write_json

ADAPTER_WEIGHTS, ADAPTER_CONFIG, FASTSOFT_META = "adapter_model.safetensors", "adapter_config.json", "fastsoft.json"


def save_prompt(
    folder: str | Path,
    prompt: torch.Tensor,
    *,
    model_path: str,
    model_fingerprint: str,
    template: Template,
    extra: dict | None = None,
) -> Path:
    """Write ``prompt [P, H]`` as a PEFT prompt-tuning adapter into ``folder``; a NaN or infinite one is refused before
    anything is written (it would answer nothing)."""
    folder = Path(folder)
    weights = {"prompt_embeddings": prompt.detach().float().cpu().contiguous()}
    if not bool(torch.isfinite(weights["prompt_embeddings"]).all()):
        raise FastsoftError(
            f"the soft prompt for {folder} holds NaN or infinite values, so it was not exported; compress the job "
            "again (a lower --lr may help)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    length, hidden = prompt.shape
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": length,
        "token_dim": hidden,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": model_path,
        "inference_mode": True,
    }
    write_json(folder / ADAPTER_CONFIG, config)
    meta = {
        "placement": template.placement,
        "template": {"head": template.head, "middle": template.middle, "tail": template.tail, "kind": template.kind},
        "model_fingerprint": model_fingerprint,
        "peft_equivalent": template.placement == "first",
        **(extra or {}),
    }
    write_json(folder / FASTSOFT_META, meta)
    return folder


def load_prompt(folder: str | Path) -> tuple[torch.Tensor, Template, dict]:
    """The soft prompt ``[P, H]``, the template it was trained with, and the export's metadata."""
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FastsoftError(f"{folder} holds no soft prompt ({ADAPTER_WEIGHTS} is missing)")
    try:
        prompt = load_file(str(weights)).get("prompt_embeddings")
    except (SafetensorError, OSError) as error:
        raise FastsoftError(f"{weights} is truncated or damaged ({error}); export the prompt again") from error
    if prompt is None or prompt.dim() != 2:
        raise FastsoftError(f"{weights} has no [P, H] tensor named prompt_embeddings")
    if not bool(torch.isfinite(prompt).all()):  # it would generate nothing, silently
        raise FastsoftError(f"{weights} holds NaN or infinite values, so it answers nothing; compress the job again")
    meta_path = folder / FASTSOFT_META
    if not meta_path.is_file():  # a plain PEFT export: its virtual tokens stand first
        return prompt, None, {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        t = meta["template"]
        template = Template(t["head"], t["middle"], t["tail"], meta["placement"], t.get("kind", "chat"))
    except (ValueError, KeyError, TypeError) as error:  # bad JSON (a ValueError), or not the keys fastsoft writes
        raise FastsoftError(
            f"{meta_path} is damaged ({type(error).__name__}: {error}); export the prompt again"
        ) from error
    return prompt, template, meta
