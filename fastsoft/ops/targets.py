"""Teacher targets accepted by ``fastsoft.ops.softmax_kl``: one small type per kind, one protocol.

Every kind indexes by rows like a tensor and shares the same protocol, so code that moves teachers
around (the cache, the packed step) never switches on the kind:

- ``len(t)``, ``t[rows]``: the number of rows, a row slice (or index tensor);
- ``t.to(device)``;
- ``Kind.concat(parts)``: one target from row blocks of the same kind;
- ``t.tensors()`` / ``Kind.from_tensors(d)``: the named tensors a cache stores, and back.

Kinds: :class:`DenseTarget` (teacher log-probs ``[N, V]``), :class:`SparseTarget` (ids and weights, optional
tail), :class:`HiddenTarget` (teacher hidden states ``[N, H]``) and :class:`CompactTarget` (``wbar [N, H]`` and
``sum q log q [N]``: a dense or hidden teacher, exact for the forward KL at the temperature it was built at).

A bare ``[N, V]`` tensor passed to ``softmax_kl`` is read as a :class:`DenseTarget` (:func:`as_target`).

What a target type can do is said once, in class attributes that the settings check, ``softmax_kl``, every backend
and the objectives read (never an ``isinstance`` test of their own):

- ``DIVERGENCES``: the ``softmax_kl`` divergences it serves. A target that keeps only a linear functional of the
  teacher distribution (sparse, compact) serves ``forward`` alone: the reverse KL and the JSD are not linear in the
  teacher and need the whole distribution (dense, hidden);
- ``GRAD_FILTER``: the divergences whose backward the gradient filter (``softmax_kl(grad_filter=...)``) is written for;
- ``VOCAB_ROWS``: it stores a ``[V]`` row a token (the largest cache; an automatic choice takes it last).

:func:`check_divergence` and :func:`check_grad_filter` are the refusals built from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

DIVERGENCES = ("forward", "reverse", "jsd")  # softmax_kl's divergences
_EVERY = frozenset(DIVERGENCES)
_LINEAR = frozenset({"forward"})  # what a target linear in the teacher distribution serves


@dataclass(frozen=True)
class DenseTarget:
    """Teacher log-probs ``[N, V]`` (or logits: they are renormalised at the loss temperature)."""

    DIVERGENCES: ClassVar[frozenset[str]] = _EVERY  # the whole teacher distribution
    GRAD_FILTER: ClassVar[frozenset[str]] = frozenset()
    VOCAB_ROWS: ClassVar[bool] = True

    logprobs: torch.Tensor

    def __post_init__(self):
        if self.logprobs.dim() != 2:
            raise ValueError(f"a dense teacher must be log-probs of shape [N, V], got {tuple(self.logprobs.shape)}")

    def __getitem__(self, rows) -> DenseTarget:
        return DenseTarget(self.logprobs[rows])

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def to(self, device) -> DenseTarget:
        return DenseTarget(self.logprobs.to(device))

    @classmethod
    def concat(cls, parts: list[DenseTarget]) -> DenseTarget:
        return cls(torch.cat([p.logprobs for p in parts]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"logprobs": self.logprobs}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> DenseTarget:
        return cls(tensors["logprobs"])


@dataclass(frozen=True)
class SparseTarget:
    """A sparse target measure over the vocabulary, one row per token.

    Args:
        ids: ``[N, K]`` integer vocabulary ids (int32 or int64). Ids within a row should be distinct.
        probs: ``[N, K]`` weights ``w`` of those ids: top-k teacher probabilities, or sample counts
            divided by the number of samples. ``K = 1`` with weight 1 is plain cross-entropy.
        tail: ``[N]`` or None. The teacher mass outside the ids (``1 - sum(top-k)``); when given,
            the loss is the exact KL between the ``K + 1`` buckets (top-k ids + everything else).
    """

    DIVERGENCES: ClassVar[frozenset[str]] = _LINEAR  # a linear functional of the teacher
    GRAD_FILTER: ClassVar[frozenset[str]] = frozenset()
    VOCAB_ROWS: ClassVar[bool] = False

    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor | None = None

    def __post_init__(self):
        if self.ids.dim() != 2 or self.ids.shape != self.probs.shape:
            raise ValueError(
                f"SparseTarget needs ids and probs of the same shape [N, K], got {tuple(self.ids.shape)} and {tuple(self.probs.shape)}"
            )
        if self.ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"SparseTarget ids must be int32 or int64, got {self.ids.dtype}")
        if self.tail is not None and self.tail.shape != self.ids.shape[:1]:
            raise ValueError(
                f"SparseTarget tail must have shape [N] = [{self.ids.shape[0]}], got {tuple(self.tail.shape)}"
            )

    def __getitem__(self, rows) -> SparseTarget:
        return SparseTarget(self.ids[rows], self.probs[rows], None if self.tail is None else self.tail[rows])

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> SparseTarget:
        return SparseTarget(
            self.ids.to(device), self.probs.to(device), None if self.tail is None else self.tail.to(device)
        )

    @classmethod
    def concat(cls, parts: list[SparseTarget]) -> SparseTarget:
        """Rows of several targets; narrower rows are padded with weight-0 ids (they change nothing)."""
        width = max(p.ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        tail = torch.cat([p.tail for p in parts]) if parts[0].tail is not None else None
        return cls(torch.cat([pad(p.ids, 0) for p in parts]), torch.cat([pad(p.probs, 0.0) for p in parts]), tail)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "probs": self.probs, **({} if self.tail is None else {"tail": self.tail})}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SparseTarget:
        return cls(tensors["ids"], tensors["probs"], tensors.get("tail"))

    @staticmethod
    def one_hot(ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> SparseTarget:
        """Hard targets ``ids [N]``: the loss becomes plain cross-entropy (log-likelihood objectives)."""
        return SparseTarget(ids[:, None], torch.ones(ids.shape[0], 1, dtype=dtype, device=ids.device))


@dataclass(frozen=True)
class HiddenTarget:
    """Teacher final hidden states ``[N, H]``; teacher logits are recomputed with the same ``lm_weight``."""

    DIVERGENCES: ClassVar[frozenset[str]] = _EVERY  # the whole teacher distribution, recomputed
    GRAD_FILTER: ClassVar[frozenset[str]] = frozenset()
    VOCAB_ROWS: ClassVar[bool] = False

    hidden: torch.Tensor

    def __post_init__(self):
        if self.hidden.dim() != 2:
            raise ValueError(f"HiddenTarget needs hidden states of shape [N, H], got {tuple(self.hidden.shape)}")

    def __getitem__(self, rows) -> HiddenTarget:
        return HiddenTarget(self.hidden[rows])

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device) -> HiddenTarget:
        return HiddenTarget(self.hidden.to(device))

    @classmethod
    def concat(cls, parts: list[HiddenTarget]) -> HiddenTarget:
        return cls(torch.cat([p.hidden for p in parts]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hidden": self.hidden}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> HiddenTarget:
        return cls(tensors["hidden"])


# Bytes of one [C, V] temporary while a CompactTarget is built; about four of them are alive at a time.
_BUILD_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class CompactTarget:
    """A dense or hidden teacher in ``H + 1`` numbers a token, exact for the forward KL at one temperature.

    With the frozen ``lm_weight`` ``W [V, H]`` and ``q = softmax(teacher logits / T)``,
    ``KL(q || softmax(h W^T / T)) = sum_v q_v log q_v - h . wbar / T + logsumexp(h W^T / T)`` with
    ``wbar = sum_v q_v W_v``, and its gradient is ``(sum_v p_v W_v - wbar) / T``: both exact, and the loss
    is cross-entropy-shaped (no teacher read over the vocabulary). See ``kernels/softmax_kl.md``.

    Args:
        wbar: ``[N, H]`` the teacher-weighted sums of ``W`` rows (fp32, fp64 for the tests' ground truth).
        neg_entropy: ``[N]`` the teacher's ``sum_v q_v log q_v``.
        temperature: the ``T`` the target was built at; ``softmax_kl`` refuses it at any other temperature.

    Build it with :meth:`from_logprobs` (dense teacher log-probs or logits) or :meth:`from_hidden`
    (teacher final hidden states); both stream the vocabulary in row chunks (one ``[C, V]`` block alive).
    """

    DIVERGENCES: ClassVar[frozenset[str]] = _LINEAR  # a linear functional of the teacher
    GRAD_FILTER: ClassVar[frozenset[str]] = frozenset({"forward"})
    VOCAB_ROWS: ClassVar[bool] = False

    wbar: torch.Tensor
    neg_entropy: torch.Tensor
    temperature: float

    def __post_init__(self):
        if self.wbar.dim() != 2 or self.neg_entropy.shape != self.wbar.shape[:1]:
            raise ValueError(
                f"CompactTarget needs wbar [N, H] and neg_entropy [N], got {tuple(self.wbar.shape)} and {tuple(self.neg_entropy.shape)}"
            )
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"CompactTarget temperature must be a positive number, got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))

    def __getitem__(self, rows) -> CompactTarget:
        return CompactTarget(self.wbar[rows], self.neg_entropy[rows], self.temperature)

    def __len__(self) -> int:
        return self.wbar.shape[0]

    def to(self, device) -> CompactTarget:
        return CompactTarget(self.wbar.to(device), self.neg_entropy.to(device), self.temperature)

    @classmethod
    def concat(cls, parts: list[CompactTarget]) -> CompactTarget:
        temps = {p.temperature for p in parts}
        if len(temps) != 1:
            raise ValueError(f"cannot concatenate CompactTargets built at different temperatures {sorted(temps)}")
        return cls(torch.cat([p.wbar for p in parts]), torch.cat([p.neg_entropy for p in parts]), temps.pop())

    def tensors(self) -> dict[str, torch.Tensor]:
        temperature = torch.tensor(self.temperature, dtype=torch.float64)
        return {"wbar": self.wbar, "neg_entropy": self.neg_entropy, "temperature": temperature}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CompactTarget:
        return cls(tensors["wbar"], tensors["neg_entropy"], float(tensors["temperature"]))

    @classmethod
    def from_logprobs(
        cls, logprobs: torch.Tensor, lm_weight: torch.Tensor, temperature: float, *, chunk_rows: int | None = None
    ) -> CompactTarget:
        """Exact compact form of a dense teacher ``[N, V]`` at ``temperature``: ``q = softmax(logprobs / T)``.

        The same re-tempering as the dense path (``log_softmax(t / T)``), so logits work as well as log-probs.
        Computed in fp32 (fp64 when an input is fp64); at most ``chunk_rows`` rows of ``[C, V]`` alive at a time.
        """
        if logprobs.dim() != 2 or lm_weight.dim() != 2 or logprobs.shape[1] != lm_weight.shape[0]:
            raise ValueError(
                f"from_logprobs needs log-probs [N, V] and lm_weight [V, H], got {tuple(logprobs.shape)} and {tuple(lm_weight.shape)}"
            )
        return cls._build(
            lambda rows, w: logprobs[rows].to(w.dtype), len(logprobs), lm_weight, temperature, chunk_rows, logprobs
        )

    @classmethod
    def from_hidden(
        cls, hidden: torch.Tensor, lm_weight: torch.Tensor, temperature: float, *, chunk_rows: int | None = None
    ) -> CompactTarget:
        """Exact compact form of a hidden-state teacher ``[N, H]`` at ``temperature``: ``q = softmax(h_t W^T / T)``.

        Computed in fp32 (fp64 when an input is fp64); at most ``chunk_rows`` rows of ``[C, V]`` alive at a time.
        """
        if hidden.dim() != 2 or lm_weight.dim() != 2 or hidden.shape[1] != lm_weight.shape[1]:
            raise ValueError(
                f"from_hidden needs hidden states [N, H] and lm_weight [V, H], got {tuple(hidden.shape)} and {tuple(lm_weight.shape)}"
            )
        return cls._build(
            lambda rows, w: hidden[rows].to(w.dtype) @ w.T, len(hidden), lm_weight, temperature, chunk_rows, hidden
        )

    @classmethod
    def _build(
        cls, logits_of, n: int, lm_weight: torch.Tensor, temperature: float, chunk_rows, source
    ) -> CompactTarget:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        cd = torch.float64 if torch.float64 in (source.dtype, lm_weight.dtype) else torch.float32
        weight = lm_weight.to(cd)
        vocab = weight.shape[0]
        chunk = chunk_rows or max(1, _BUILD_CHUNK_BYTES // (max(vocab, 1) * torch.finfo(cd).bits // 8))
        wbar = torch.empty(n, weight.shape[1], dtype=cd, device=weight.device)
        neg_entropy = torch.empty(n, dtype=cd, device=weight.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            q_log = torch.log_softmax(logits_of(rows, weight) / temperature, -1)  # [C, V]
            q = q_log.exp()
            wbar[rows] = q @ weight
            neg_entropy[rows] = torch.where(q > 0, q * q_log, torch.zeros_like(q)).sum(-1)  # 0 log 0 = 0
        return cls(wbar, neg_entropy, float(temperature))


Target = Union[DenseTarget, SparseTarget, HiddenTarget, CompactTarget]
Teacher = Union[torch.Tensor, Target]  # what softmax_kl accepts: a bare tensor is dense


TARGET_TYPES: tuple[type, ...] = (DenseTarget, SparseTarget, HiddenTarget, CompactTarget)


def as_target(teacher: Teacher) -> Target:
    """The target object for what a caller passed: a bare ``[N, V]`` tensor becomes a :class:`DenseTarget`."""
    if isinstance(teacher, torch.Tensor):
        return DenseTarget(teacher)
    if isinstance(teacher, TARGET_TYPES):
        return teacher
    raise TypeError(
        f"teacher must be a [N, V] tensor, {one_of(t.__name__ for t in TARGET_TYPES)}, got {type(teacher).__name__}"
    )


def one_of(names) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def check_divergence(teacher: Target, divergence: str) -> None:
    """Refuse a target whose type does not serve ``divergence`` (its ``DIVERGENCES``), naming the types that do."""
    if divergence not in type(teacher).DIVERGENCES:
        serving = one_of(t.__name__ for t in TARGET_TYPES if divergence in t.DIVERGENCES)
        raise ValueError(
            f"divergence {divergence!r} needs a {serving}, got {type(teacher).__name__}: it is not linear in the "
            "teacher, so it needs the full teacher distribution"
        )


def check_grad_filter(teacher: Target, divergence: str, need_grad: bool = True) -> None:
    """Refuse the gradient filter where it is not written: a target type and divergence outside its ``GRAD_FILTER``,
    or no gradient wanted."""
    if not (divergence in type(teacher).GRAD_FILTER and need_grad):
        serving = one_of(t.__name__ for t in TARGET_TYPES if t.GRAD_FILTER)
        divergences = one_of(sorted({d for t in TARGET_TYPES for d in t.GRAD_FILTER}))
        raise ValueError(
            f"grad_filter needs a {serving} teacher, the {divergences} divergence and a gradient "
            f"(got {type(teacher).__name__}, divergence {divergence!r}, need_grad={need_grad}; pass grad_filter=0)"
        )
