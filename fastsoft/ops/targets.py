"""Teacher targets accepted by ``fastsoft.ops.softmax_kl``.

A dense teacher is a plain ``[N, V]`` tensor of log-probs (or logits: it is renormalised at the
loss temperature). The two structured kinds are below; both index by rows like a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


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
            raise ValueError(f"SparseTarget needs ids and probs of the same shape [N, K], got {tuple(self.ids.shape)} and {tuple(self.probs.shape)}")
        if self.ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"SparseTarget ids must be int32 or int64, got {self.ids.dtype}")
        if self.tail is not None and self.tail.shape != self.ids.shape[:1]:
            raise ValueError(f"SparseTarget tail must have shape [N] = [{self.ids.shape[0]}], got {tuple(self.tail.shape)}")

    def __getitem__(self, rows) -> "SparseTarget":
        return SparseTarget(self.ids[rows], self.probs[rows], None if self.tail is None else self.tail[rows])

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> "SparseTarget":
        return SparseTarget(self.ids.to(device), self.probs.to(device), None if self.tail is None else self.tail.to(device))

    @staticmethod
    def one_hot(ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> "SparseTarget":
        """Hard targets ``ids [N]``: the loss becomes plain cross-entropy (log-likelihood objectives)."""
        return SparseTarget(ids[:, None], torch.ones(ids.shape[0], 1, dtype=dtype, device=ids.device))


@dataclass(frozen=True)
class HiddenTarget:
    """Teacher final hidden states ``[N, H]``; teacher logits are recomputed with the same ``lm_weight``."""

    hidden: torch.Tensor

    def __post_init__(self):
        if self.hidden.dim() != 2:
            raise ValueError(f"HiddenTarget needs hidden states of shape [N, H], got {tuple(self.hidden.shape)}")

    def __getitem__(self, rows) -> "HiddenTarget":
        return HiddenTarget(self.hidden[rows])

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device) -> "HiddenTarget":
        return HiddenTarget(self.hidden.to(device))


Teacher = Union[torch.Tensor, SparseTarget, HiddenTarget]
