"""Teacher targets accepted by ``fastsoft.ops.softmax_kl``: one small type per kind, one protocol.

Every kind indexes by rows like a tensor and shares the same protocol, so code that moves teachers
around (the cache, the packed step) never switches on the kind:

- ``len(t)``, ``t[rows]``: the number of rows, a row slice (or index tensor);
- ``t.to(device)``;
- ``Kind.concat(parts)``: one target from row blocks of the same kind;
- ``t.tensors()`` / ``Kind.from_tensors(d)``: the named tensors a cache stores, and back.

A bare ``[N, V]`` tensor passed to ``softmax_kl`` is read as a :class:`DenseTarget` (:func:`as_target`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class DenseTarget:
    """Teacher log-probs ``[N, V]`` (or logits: they are renormalised at the loss temperature)."""

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


Target = Union[DenseTarget, SparseTarget, HiddenTarget]
Teacher = Union[torch.Tensor, Target]  # what softmax_kl accepts: a bare tensor is dense


def as_target(teacher: Teacher) -> Target:
    """The target object for what a caller passed: a bare ``[N, V]`` tensor becomes a :class:`DenseTarget`."""
    if isinstance(teacher, torch.Tensor):
        return DenseTarget(teacher)
    if isinstance(teacher, (DenseTarget, SparseTarget, HiddenTarget)):
        return teacher
    raise TypeError(
        f"teacher must be a [N, V] tensor, DenseTarget, SparseTarget or HiddenTarget, got {type(teacher).__name__}"
    )
