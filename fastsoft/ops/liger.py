"""A drop-in for Liger-Kernel's fused linear KL loss, implemented on :func:`fastsoft.ops.softmax_kl`.

Switching a library over is one line::

    # from liger_kernel.transformers import LigerFusedLinearKLDivLoss
    from fastsoft.ops.liger import LigerFusedLinearKLDivLoss

Same constructor ``(reduction="batchmean", ignore_index=-100, temperature=1.0, eps=1e-10, accum_dtype=None)``
and forward ``(student_input [BT, H], student_weight [V, H], target [BT, V] probabilities, shift_labels [BT] | None)``
as ``liger_kernel.transformers.LigerFusedLinearKLDivLoss`` (liger-kernel 0.8.5), which computes
``KL(target || softmax(student_input @ student_weight.T / temperature))`` per row.

How each argument maps onto ``softmax_kl``:

- ``target`` (probabilities ``q``) becomes the dense teacher ``temperature * log(q)`` in fp32, so that
  fastsoft's re-tempering ``log_softmax(t / T)`` gives back ``log q`` (exactly, for rows that sum to 1;
  a row that does not is renormalised, where Liger would use it unnormalised). It is converted a chunk
  of rows at a time, so no ``[BT, V]`` fp32 copy is ever alive.
- ``shift_labels == ignore_index`` rows get ``token_weight`` 0: loss 0, gradient 0 (as in Liger).
- ``reduction``: ``"sum"``; ``"batchmean"`` = sum / number of kept rows; ``"mean"`` = sum / (kept rows * V),
  0 when every row is ignored (torch ``KLDivLoss`` semantics, as in Liger). ``"none"`` is refused, as in Liger.
- ``eps``: fastsoft treats ``q = 0`` exactly (``0 log 0 = 0``); Liger clamps ``q`` to ``eps`` inside the log,
  which changes the value by less than ``eps * |log eps|`` per entry. Accepted and ignored.
- ``accum_dtype``: only affects Liger's weight-gradient buffer. Accepted and ignored.

One deliberate difference: **no gradient for ``student_weight``** (fastsoft's lm_head is frozen), where
Liger computes one when ``student_weight.requires_grad``. Use Liger itself to train the lm_head.
"""

from __future__ import annotations

import torch

from fastsoft.ops.softmax_kl import softmax_kl

# Bytes of the fp32 teacher log-probs converted at a time.
TARGET_CHUNK_BYTES = 256 * 2**20


class LigerFusedLinearKLDivLoss(torch.nn.Module):
    """Liger-compatible fused linear KL loss on fastsoft's ``softmax_kl`` (see the module docstring).

    Args:
        reduction: ``"batchmean"`` (default), ``"mean"`` or ``"sum"``.
        ignore_index: rows whose ``shift_labels`` equal it are ignored.
        temperature: student logits are divided by it (the target is used as given).
        eps: accepted for compatibility; ``q = 0`` is handled exactly.
        accum_dtype: accepted for compatibility; there is no weight gradient to accumulate.
        backend: fastsoft backend (``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``); not in Liger's signature.
    """

    def __init__(
        self,
        reduction: str | None = "batchmean",
        ignore_index: int = -100,
        temperature: float = 1.0,
        eps: float = 1e-10,
        accum_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        assert temperature != 0, "temperature cannot be 0."
        if reduction not in ("batchmean", "mean", "sum"):
            raise ValueError(
                f"reduction must be one of ('batchmean', 'mean', 'sum'), got {reduction!r}; 'none' is not supported"
            )
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.eps = eps
        self.accum_dtype = accum_dtype
        self.backend = backend

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        target: torch.Tensor,
        shift_labels: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss; the gradient flows to ``student_input`` only.

        Args:
            student_input: ``[BT, H]`` hidden states.
            student_weight: ``[V, H]`` lm_head weight (frozen).
            target: ``[BT, V]`` teacher probabilities.
            shift_labels: ``[BT]`` or None; rows equal to ``ignore_index`` are ignored.
        """
        n, vocab = target.shape
        token_weight = None
        if shift_labels is not None:
            if shift_labels.shape != (n,):
                raise ValueError(f"the shape of shift_labels must be (BT,) = ({n},), got {tuple(shift_labels.shape)}")
            token_weight = (shift_labels != self.ignore_index).to(student_input.dtype)
        rows = max(1, TARGET_CHUNK_BYTES // (4 * max(vocab, 1)))
        work = torch.promote_types(target.dtype, torch.float32)  # fp32 log-probs (fp64 stays fp64)
        total = student_input.new_zeros((), dtype=torch.promote_types(student_input.dtype, torch.float32))
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            teacher = (
                target[start:stop].to(work, copy=True).log_().mul_(self.temperature)
            )  # log_softmax(teacher / T) == log q
            total = total + softmax_kl(
                student_input[start:stop],
                student_weight,
                teacher,
                temperature=self.temperature,
                token_weight=None if token_weight is None else token_weight[start:stop],
                reduction="sum",
                backend=self.backend,
            )
        if self.reduction == "sum":
            return total
        kept = token_weight.sum() if token_weight is not None else total.new_tensor(float(n))
        if self.reduction == "mean":
            kept = kept * vocab
        return torch.where(kept > 0, total / kept.clamp_min(1), torch.zeros_like(total))

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction}, ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"eps={self.eps}, accum_dtype={self.accum_dtype}, backend={self.backend!r}"
        )
