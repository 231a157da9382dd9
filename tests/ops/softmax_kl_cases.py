"""Teachers for the softmax_kl suites (reference, C++, Triton): one generator of every target kind."""

from __future__ import annotations

import zlib

import torch

from fastsoft.ops import CompactTarget, HiddenTarget, SparseTarget

KINDS = ["dense", "hidden", "topk", "sampled", "onehot", "compact"]


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process (``hash()`` of a str is not: PYTHONHASHSEED)."""
    return zlib.crc32(repr(parts).encode())


def make_teacher(
    kind: str,
    n: int,
    v: int,
    h_dim: int,
    gen: torch.Generator,
    dtype=torch.float64,
    sharp: float = 1.0,
    k: int = 5,
    ids_dtype=torch.long,
    lm_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
):
    """A random teacher of ``kind`` for ``n`` rows over a vocabulary of ``v``.

    ``sharp`` scales the logits (dense), the hidden states (hidden) or the weights' logits (sparse):
    0 gives flat teachers, large values near one-hot ones. Beyond :data:`KINDS`: ``dense-sharp`` (sharp 8
    with exact zeros in row 0), ``topk-wide`` (K = 40), ``topk-dup`` (a repeated id), ``topk-tinytail``
    (tail mass 1e-4).

    ``compact`` (a hidden teacher as a :class:`CompactTarget`) and ``compact-dense`` (a dense one) are built with
    ``lm_weight`` at ``temperature``, the temperature the loss must then be called with.
    """
    if kind in ("compact", "compact-dense"):
        if lm_weight is None:
            raise ValueError("a compact teacher is built with the lm_head: pass lm_weight= (and temperature=)")
        if kind == "compact":
            return CompactTarget.from_hidden(
                sharp * torch.randn(n, h_dim, generator=gen, dtype=dtype), lm_weight, temperature
            )
        logprobs = torch.log_softmax(sharp * torch.randn(n, v, generator=gen, dtype=dtype), -1)
        return CompactTarget.from_logprobs(logprobs, lm_weight, temperature)
    if kind in ("dense", "dense-sharp"):
        t = torch.log_softmax(
            (8.0 if kind == "dense-sharp" else sharp) * torch.randn(n, v, generator=gen, dtype=dtype), -1
        )
        if kind == "dense-sharp" and n:
            t[0, : v // 2] = float("-inf")  # exact zeros in the teacher
        return t
    if kind == "hidden":
        return HiddenTarget(sharp * torch.randn(n, h_dim, generator=gen, dtype=dtype))
    k = 40 if kind == "topk-wide" else k
    ids = (
        torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
        if n
        else torch.zeros(0, k, dtype=torch.long)
    )
    probs = torch.softmax(sharp * torch.randn(n, k, generator=gen, dtype=dtype), -1)
    if kind == "onehot":
        return SparseTarget.one_hot(ids[:, 0], dtype=dtype)
    if kind == "sampled":
        return SparseTarget(ids.to(ids_dtype), probs)  # weights sum to 1, no tail
    if kind == "topk-dup" and n:
        ids[:, 1] = ids[:, 0]  # a repeated id: counted once in the tail mask, twice in sum(w)
    probs = probs * (0.9999 if kind == "topk-tinytail" else 0.7)
    return SparseTarget(ids.to(ids_dtype), probs, 1 - probs.sum(-1))


def cast_teacher(teacher, dtype):
    """The same teacher with its floating-point tensors in ``dtype`` (ids unchanged)."""
    if isinstance(teacher, SparseTarget):
        return SparseTarget(
            teacher.ids, teacher.probs.to(dtype), None if teacher.tail is None else teacher.tail.to(dtype)
        )
    if isinstance(teacher, HiddenTarget):
        return HiddenTarget(teacher.hidden.to(dtype))
    if isinstance(teacher, CompactTarget):
        return CompactTarget(teacher.wbar.to(dtype), teacher.neg_entropy.to(dtype), teacher.temperature)
    return teacher.to(dtype)
