"""Teacher kinds: what the cache keeps per scored position, built from the teacher's final hidden states.

One table, :data:`KINDS`, is the one place a kind is defined: its name, which target type (``fastsoft/ops/targets.py``)
it yields, which parameters change its contents, how to build it, and its line in ``--teacher``'s help. What a kind
can do (the divergences it serves, the gradient filter) is its target type's (``DIVERGENCES``, ``GRAD_FILTER``); the
settings (``fastsoft/config.py``) take the names, the help and the automatic choice (:func:`automatic_kind`) from here.
The cache and the packed step only use the targets' shared protocol (slice, move, concatenate, serialise).

- ``dense``: log-probs ``[V]`` a token (exact);
- ``topk``: the top-k ids and probabilities plus the tail mass (the exact ``K + 1``-bucket KL);
- ``sampled``: ids drawn from the teacher with count weights (unbiased; Anshumann et al. 2025);
- ``hidden``: the teacher's final hidden states ``[H]`` (exact; logits recomputed inside the loss);
- ``compact``: ``wbar = sum_v q_v W_v`` ``[H]`` and ``sum_v q_v log q_v`` at the loss temperature (built in fp64, stored in fp32): the exact
  forward KL in ``(H + 1) * 4`` bytes a token, and a cross-entropy-shaped loss (no teacher read over the vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch

from fastsoft.errors import FastsoftError
from fastsoft.ops import CompactTarget, DenseTarget, HiddenTarget, SparseTarget, Target

CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds: its kind and the parameters that change its contents."""

    kind: str = "dense"
    top_k: int = 64
    samples: int = 64
    temperature: float = 1.0  # sparse kinds are truncated/sampled, compact ones built, at this temperature
    dtype: str = "fp32"  # storage of dense log-probs and hidden states

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FastsoftError(f"unknown teacher cache kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.dtype not in CACHE_DTYPES:
            raise FastsoftError(f"unknown cache dtype {self.dtype!r}; choose bf16 or fp32")
        if self.top_k < 1 or self.samples < 1:
            raise FastsoftError("top-k and the number of samples must be at least 1")

    @classmethod
    def of(cls, settings) -> CacheSpec:
        """The spec of a run's settings (:class:`fastsoft.config.CompressConfig`): ``kind`` is ``--teacher``,
        ``dtype`` ``--cache-dtype``, every other field the setting of its own name (a new kind's parameter needs
        only its field here and its setting)."""
        renamed = {"kind": "teacher", "dtype": "cache_dtype"}
        return cls(**{f.name: getattr(settings, renamed.get(f.name, f.name)) for f in fields(cls)})

    @property
    def target_type(self) -> type:
        return KINDS[self.kind].target_type

    def params(self) -> dict:
        """The parameters that change this kind's contents (part of the cache fingerprint)."""
        return {name: getattr(self, name) for name in KINDS[self.kind].params}

    def build(self, lm_weight: torch.Tensor, hidden: torch.Tensor, generator: torch.Generator | None = None) -> Target:
        """The target of this kind from teacher final hidden states ``[R, H]`` (on the host)."""
        return KINDS[self.kind].build(self, lm_weight, hidden, generator)


def _hidden(spec: CacheSpec, lm_weight, hidden, generator) -> HiddenTarget:
    return HiddenTarget(hidden.to(CACHE_DTYPES[spec.dtype]).cpu())


def _dense(spec: CacheSpec, lm_weight, hidden, generator) -> DenseTarget:
    logits = hidden.float() @ lm_weight.float().T  # [R, V]; R is one job's answer tokens
    return DenseTarget(torch.log_softmax(logits, -1).to(CACHE_DTYPES[spec.dtype]).cpu())


def _topk(spec: CacheSpec, lm_weight, hidden, generator) -> SparseTarget:
    logp = torch.log_softmax((hidden.float() @ lm_weight.float().T) / spec.temperature, -1)
    k = min(spec.top_k, logp.shape[1])
    values, ids = logp.topk(k, dim=-1)
    outside = logp.scatter(1, ids, float("-inf"))
    tail = torch.logsumexp(outside, -1).exp() if k < logp.shape[1] else torch.zeros(len(logp))
    return SparseTarget(ids.to(torch.int32).cpu(), values.exp().cpu(), tail.cpu())


def _sampled(spec: CacheSpec, lm_weight, hidden, generator) -> SparseTarget:
    logp = torch.log_softmax((hidden.float() @ lm_weight.float().T) / spec.temperature, -1)
    draws = torch.multinomial(logp.exp().cpu(), spec.samples, replacement=True, generator=generator)  # [R, S]
    counts = torch.zeros(len(logp), logp.shape[1]).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float32))
    width = int((counts > 0).sum(-1).max()) if len(logp) else 1
    weights, ids = counts.topk(width, dim=-1)  # unsampled ids (weight 0) only pad the rows
    return SparseTarget(ids.to(torch.int32), weights / spec.samples)


def _compact(spec: CacheSpec, lm_weight, hidden, generator) -> CompactTarget:
    # Built in fp64, stored in fp32: fp32 logits h W^T carry ~1e-4 absolute rounding at |h| ~ 45 (SmolLM2), which
    # moved step-1 losses by 2e-4; fp64 leaves only the storage rounding. Valid only at the temperature it is built at.
    target = CompactTarget.from_hidden(hidden.double(), lm_weight.double(), spec.temperature)
    return CompactTarget(target.wbar.float().cpu(), target.neg_entropy.float().cpu(), target.temperature)


@dataclass(frozen=True)
class Kind:
    """One teacher kind: its target type (whose attributes say what it serves), the parameters that change its
    contents, its builder, and what ``--teacher``'s help says of it."""

    target_type: type
    params: tuple[str, ...]
    build: Callable[[CacheSpec, torch.Tensor, torch.Tensor, torch.Generator | None], Target]
    about: str

    def serves(self, divergences: Iterable[str]) -> bool:
        """Whether the loss can use this kind for every one of ``divergences`` (``softmax_kl``'s names)."""
        return set(divergences) <= self.target_type.DIVERGENCES


KINDS: dict[str, Kind] = {
    "dense": Kind(DenseTarget, ("dtype",), _dense, "exact [V] log-probs"),
    "topk": Kind(SparseTarget, ("top_k", "temperature"), _topk, "the --top-k likeliest ids and the tail mass"),
    "sampled": Kind(SparseTarget, ("samples", "temperature"), _sampled, "--samples draws, unbiased"),
    "hidden": Kind(HiddenTarget, ("dtype",), _hidden, "exact; [H] hidden states, logits recomputed in the loss"),
    "compact": Kind(
        CompactTarget, ("temperature",), _compact, "exact forward KL at --temperature in H+1 fp32 numbers a token"
    ),
}
DEFAULT_KIND = "compact"


def kinds_serving(divergences: Iterable[str]) -> list[str]:
    """The kinds that serve every one of ``divergences``, in the table's order."""
    divergences = set(divergences)
    return [name for name, kind in KINDS.items() if kind.serves(divergences)]


def kinds_filtering(divergences: Iterable[str]) -> list[str]:
    """The kinds whose gradient filter applies to one of ``divergences``, in the table's order."""
    divergences = set(divergences)
    return [name for name, kind in KINDS.items() if kind.target_type.GRAD_FILTER & divergences]


def automatic_kind(divergences: Iterable[str]) -> str:
    """The kind a run that names none uses for an objective of ``divergences``: :data:`DEFAULT_KIND` when it serves
    them; else the first kind that does in the table's order, those that store a ``[V]`` row a token (their
    ``VOCAB_ROWS``) last: rkl and jsd get ``hidden``, as exact as ``dense`` in an ``H``-number row instead of ``V``;
    :data:`DEFAULT_KIND` again when none does (the settings check then refuses the objective)."""
    serving = kinds_serving(divergences)
    if DEFAULT_KIND in serving or not serving:
        return DEFAULT_KIND
    return min(serving, key=lambda name: KINDS[name].target_type.VOCAB_ROWS)
