"""``softmax_kl``: fused lm_head + softmax + KL/cross-entropy against a teacher, gradient for ``hidden`` only.

One semantics, three backends, dispatched by device:

- ``triton``    — ``fastsoft.kernels.softmax_kl`` (CUDA; also CPU tensors under ``TRITON_INTERPRET=1``);
- ``cpp``       — the C++ extension ``fastsoft._C`` (CPU), see ``fastsoft/ops/cpp.py``;
- ``reference`` — pure PyTorch, chunked over tokens (``fastsoft/ops/reference.py``): ground truth and last fallback.

Every backend implements the same row contract (see ``reference.softmax_kl_rows``): per-row loss
``[N]`` fp32 plus, when a gradient is needed, ``d loss_n / d hidden_n`` computed in the same pass.
Token weights and the reduction are applied here on the ``[N]`` vector, so the backward pass is a
row-wise scale of the stored gradient and never touches the vocabulary again.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastsoft.errors import BackendUnavailable
from fastsoft.ops import reference
from fastsoft.ops.targets import (
    DIVERGENCES,
    CompactTarget,
    DenseTarget,
    HiddenTarget,
    Teacher,
    as_target,
    check_divergence,
    check_grad_filter,
)

BACKENDS = ("triton", "cpp", "reference")
REDUCTIONS = ("mean", "sum", "none")

RowsFn = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]


# The tile filter's threshold assumes a row's gradient norm is at least FILTER_RHO x the largest ||W_v|| / T (on
# SmolLM2's own distributions ~90 % of rows are above 2 %); rows below it that lost anything are recomputed.
FILTER_RHO = 0.01


@dataclass(frozen=True)
class FilterReport:
    """What the gradient filter did in one call.

    Attributes:
        skipped: share of the backward GEMM's (row, vocabulary column) products skipped, in [0, 1].
        recomputed: rows recomputed unfiltered because their bound exceeded ``eps``.
        bound: the largest guaranteed relative error ``dropped_n / (||grad_n|| - dropped_n)`` left in any row (<= eps).
    """

    skipped: float
    recomputed: int
    bound: float


_NORMS: dict = {}


def _row_norms(lm_weight: torch.Tensor) -> torch.Tensor:
    """``||W_v||`` ``[V]`` fp32, cached for the last weight seen (a frozen lm_head is the same tensor every step)."""
    key = (lm_weight.data_ptr(), lm_weight._version, tuple(lm_weight.shape), lm_weight.dtype, lm_weight.device)
    if key not in _NORMS:
        _NORMS.clear()
        _NORMS[key] = lm_weight.detach().float().norm(dim=1)
    return _NORMS[key]


def filtered_rows(
    rows_fn: RowsFn,
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher: CompactTarget,
    temperature: float,
    token_weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, FilterReport]:
    """Per-row losses and gradients with the backward's tile filter, every row within ``eps`` of exact.

    The backend skips a vocabulary tile's share of ``dz @ W`` for a block of rows when every row's probability mass
    there times the tile's largest ``||W_v||`` is at most ``eps * FILTER_RHO * max_v ||W_v|| / V`` per column, and
    returns per row ``dropped_n = sum_{skipped v} p_v ||W_v|| / T``, which bounds the norm of what was left out
    (triangle inequality). Every row with ``dropped_n > eps / (1 + eps) * ||grad_n||`` is then recomputed unfiltered,
    so for every row ``||grad_n - exact_n|| <= eps * ||exact_n||``. The loss is never filtered.

    Returns ``loss [N]``, ``grad [N, H]`` and a :class:`FilterReport`. Synchronises with the device once.
    """
    wnorm = _row_norms(lm_weight)
    scale = eps * FILTER_RHO * float(wnorm.max()) / max(1, lm_weight.shape[0])
    loss, grad, dropped, skipped = rows_fn(
        hidden, lm_weight, teacher, temperature, token_weight, True, grad_filter=(wnorm, scale)
    )
    norm = grad.float().norm(dim=1)
    dropped = dropped.float()
    redo = (dropped > 0) & (dropped * (1 + eps) > eps * norm)
    rows = redo.nonzero().squeeze(1)
    if len(rows):
        weight = None if token_weight is None else token_weight[rows]
        _, exact = rows_fn(hidden[rows], lm_weight, teacher[rows], temperature, weight, True)
        grad[rows] = exact
        dropped[rows] = 0
    left = torch.where(dropped > 0, dropped / (norm - dropped).clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    report = FilterReport(float(skipped), len(rows), float(left.max()) if len(left) else 0.0)
    return loss, grad, report


def _triton_status(device: torch.device) -> tuple[RowsFn | None, str]:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (device.type == "cpu" and interpret):
        return (
            None,
            f"the Triton backend needs CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)",
        )
    try:
        module = importlib.import_module("fastsoft.kernels.softmax_kl")
    except ImportError as error:  # triton missing or broken
        return None, f"the Triton backend cannot be imported ({error})"
    return module.softmax_kl_rows, ""


def _cpp_status(device: torch.device) -> tuple[RowsFn | None, str]:
    if device.type != "cpu":
        return None, f"the C++ backend runs on CPU tensors only (got {device.type})"
    try:
        from fastsoft.ops import cpp
    except ImportError as error:
        return None, f"the C++ backend cannot be imported ({error})"
    ok, why = cpp.is_available()
    return (cpp.softmax_kl_rows, "") if ok else (None, why)


_STATUS = {"triton": _triton_status, "cpp": _cpp_status, "reference": lambda device: (reference.softmax_kl_rows, "")}
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}
_warned: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> tuple[str, RowsFn]:
    """Name and row function of the backend that will run on ``device``.

    ``"auto"`` picks the fastest available one for the device and warns once when it has to fall
    back; an explicitly named backend that cannot run raises :class:`BackendUnavailable`.
    """
    if backend != "auto":
        if backend not in _STATUS:
            raise ValueError(f"unknown softmax_kl backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
        fn, why = _STATUS[backend](device)
        if fn is None:
            raise BackendUnavailable(why)
        return backend, fn
    reasons = []
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        fn, why = _STATUS[name](device)
        if fn is not None:
            if reasons and device.type not in _warned:
                _warned.add(device.type)
                warnings.warn(
                    f"fastsoft: softmax_kl falls back to the {name} backend on {device.type}: {'; '.join(reasons)}",
                    stacklevel=3,
                )
            return name, fn
        reasons.append(why)
    raise AssertionError("unreachable: the reference backend is always available")


class SoftmaxKLFunction(torch.autograd.Function):
    """Per-row losses ``[N]`` whose backward scales the gradient rows computed in the forward pass."""

    @staticmethod
    def forward(
        ctx, hidden, lm_weight, teacher, temperature, token_weight, rows_fn, divergence="forward", beta=0.5, eps=0.0
    ):
        if eps > 0 and hidden.requires_grad:
            loss, grad, _ = filtered_rows(rows_fn, hidden, lm_weight, teacher, temperature, token_weight, eps)
        elif divergence == "forward":  # today's call, unchanged
            loss, grad = rows_fn(hidden, lm_weight, teacher, temperature, token_weight, hidden.requires_grad)
        else:
            loss, grad = rows_fn(
                hidden,
                lm_weight,
                teacher,
                temperature,
                token_weight,
                hidden.requires_grad,
                divergence=divergence,
                beta=beta,
            )
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad_hidden = grad * grad_loss[:, None].to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_hidden, None, None, None, None, None, None, None, None  # never a gradient for lm_weight


def _check(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher: Teacher,
    temperature: float,
    token_weight,
    reduction: str,
    divergence: str = "forward",
    beta: float = 0.5,
    grad_filter: float = 0.0,
):
    if hidden.dim() != 2 or lm_weight.dim() != 2 or hidden.shape[1] != lm_weight.shape[1]:
        raise ValueError(
            f"softmax_kl needs hidden [N, H] and lm_weight [V, H], got {tuple(hidden.shape)} and {tuple(lm_weight.shape)}"
        )
    n, v = hidden.shape[0], lm_weight.shape[0]
    if isinstance(teacher, HiddenTarget) and teacher.hidden.shape[1] != hidden.shape[1]:
        raise ValueError(f"HiddenTarget has hidden size {teacher.hidden.shape[1]}, the student {hidden.shape[1]}")
    if isinstance(teacher, CompactTarget):
        if teacher.wbar.shape[1] != hidden.shape[1]:
            raise ValueError(f"CompactTarget has hidden size {teacher.wbar.shape[1]}, the student {hidden.shape[1]}")
        if not math.isclose(teacher.temperature, float(temperature), rel_tol=1e-9):
            raise ValueError(
                f"this CompactTarget was built at temperature {teacher.temperature} and is exact only there; "
                f"softmax_kl was called with temperature {temperature} (build the target at the loss temperature)"
            )
    if isinstance(teacher, DenseTarget) and teacher.logprobs.shape[1] != v:
        raise ValueError(
            f"a dense teacher must be log-probs of shape [N, V] = [{n}, {v}], got {tuple(teacher.logprobs.shape)}"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    check_divergence(teacher, divergence)
    if divergence == "jsd" and not (isinstance(beta, (int, float)) and 0 < beta < 1):
        raise ValueError(f"beta, the JSD's teacher weight, must be strictly between 0 and 1, got {beta!r}")
    if not (isinstance(grad_filter, (int, float)) and 0 <= grad_filter < 1):
        raise ValueError(f"grad_filter must be a number in [0, 1) (0: exact), got {grad_filter!r}")
    if grad_filter > 0:
        check_grad_filter(teacher, divergence)
    rows = len(teacher)
    if rows != n:
        raise ValueError(f"teacher has {rows} rows but hidden has {n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if token_weight is not None and token_weight.shape != (n,):
        raise ValueError(f"token_weight must have shape [N] = [{n}], got {tuple(token_weight.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def softmax_kl(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    token_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    divergence: str = "forward",
    beta: float = 0.5,
    grad_filter: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``softmax(hidden @ lm_weight.T / T)`` against a teacher measure; KL for a normalised one.

    ``L_n = sum_v w_v (log w_v - log p_v)`` with ``p = softmax(z)``, ``z = hidden_n lm_weight^T / T``.

    Args:
        hidden: ``[N, H]`` fp32/bf16/fp16 student final hidden states (normally requires grad).
        lm_weight: ``[V, H]`` lm_head weight. Treated as frozen: no gradient for it is ever allocated
            or computed, whatever its ``requires_grad`` says.
        teacher: one of
            - :class:`DenseTarget` (or a bare ``[N, V]`` tensor) of teacher log-probs; tempered as
              ``log_softmax(teacher / T)``;
            - :class:`SparseTarget` ``(ids [N, K], probs [N, K], tail [N] | None)``: top-k (with the
              exact ``K + 1``-bucket KL when ``tail`` is given) or sampled ids with count weights, used
              as given; ``K = 1`` with prob 1 is plain cross-entropy;
            - :class:`HiddenTarget` ``(hidden [N, H])``: teacher logits ``hidden_t @ lm_weight.T / T``;
            - :class:`CompactTarget` ``(wbar [N, H], neg_entropy [N], T)``: a dense or hidden teacher reduced to
              ``H + 1`` numbers a token, exact at the temperature it was built at (another ``T`` raises
              ``ValueError``); the loss is ``neg_entropy - h . wbar / T + logsumexp(z)``.
        temperature: ``T > 0``. No ``T**2`` factor is applied.
        token_weight: ``[N]`` per-row weights; 0 ignores a row (its teacher row is never trusted).
        reduction: ``"mean"`` (``sum(w * L) / sum(w)``, 0 when every row is ignored), ``"sum"``
            (``sum(w * L)``) or ``"none"`` (``w * L`` per row, ``[N]``, still differentiable).
        backend: ``"auto"`` (by device), ``"triton"``, ``"cpp"`` or ``"reference"``.
        divergence: ``"forward"`` (the default: the loss above, every teacher kind), ``"reverse"``
            (``KL(p || q) = sum_v p_v (log p_v - log q_v)``) or ``"jsd"`` (``beta KL(q || m) + (1 - beta) KL(p || m)``,
            ``m = beta q + (1 - beta) p``), with ``q = softmax(teacher logits / T)``. The last two are not linear in
            the teacher: they need a target type whose ``DIVERGENCES`` holds them (:class:`DenseTarget`,
            :class:`HiddenTarget`; a sparse or compact one raises ``ValueError``). A reverse KL where the student has
            mass and the teacher none is ``+inf`` (its row's gradient is 0).
        beta: the JSD's teacher weight, strictly between 0 and 1 (0.5: the symmetric JSD); unused otherwise.
        grad_filter: ``eps`` in ``[0, 1)``; 0 (the default) is exact. With a target type whose ``GRAD_FILTER`` holds
            the divergence (:class:`CompactTarget`, forward), the backward skips vocabulary tiles whose contribution to
            the gradient is provably small and recomputes any row that lost more than ``eps`` of its norm: every row's
            gradient ``g_n`` satisfies ``||g_n - exact_n|| <= eps ||exact_n||`` (:func:`filtered_rows`); the loss is
            exact. Other teachers raise ``ValueError``.

    Returns:
        A scalar fp32 loss (fp64 for fp64 inputs), or ``[N]`` per-row losses for ``reduction="none"``.

    Memory: never materialises the ``[N, V]`` logits (the reference keeps one token chunk of them);
    the forward pass stores one ``[N, H]`` gradient in ``hidden.dtype``; no ``[V, H]`` gradient.
    """
    teacher = as_target(teacher)
    _check(hidden, lm_weight, teacher, temperature, token_weight, reduction, divergence, beta, grad_filter)
    _, rows_fn = resolve_backend(backend, hidden.device)
    loss = SoftmaxKLFunction.apply(
        hidden, lm_weight.detach(), teacher, float(temperature), token_weight, rows_fn, divergence, float(beta),
        float(grad_filter),
    )  # fmt: skip
    if token_weight is not None:
        loss = loss * token_weight.to(loss.dtype)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if token_weight is None:
        return total / max(loss.shape[0], 1)  # a Python number: no host-to-device copy (CUDA-graph safe)
    return total / token_weight.to(loss.dtype).sum().clamp_min(torch.finfo(loss.dtype).tiny)


class SoftmaxKLLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`softmax_kl`: ``loss(hidden, lm_weight, teacher, token_weight=None)``."""

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        divergence: str = "forward",
        beta: float = 0.5,
        grad_filter: float = 0.0,
    ):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend
        self.divergence, self.beta, self.grad_filter = divergence, beta, grad_filter

    def forward(self, hidden, lm_weight, teacher, token_weight=None):
        return softmax_kl(
            hidden,
            lm_weight,
            teacher,
            temperature=self.temperature,
            token_weight=token_weight,
            reduction=self.reduction,
            backend=self.backend,
            divergence=self.divergence,
            beta=self.beta,
            grad_filter=self.grad_filter,
        )

    def extra_repr(self) -> str:
        extra = f", divergence={self.divergence!r}, beta={self.beta}" if self.divergence != "forward" else ""
        extra += f", grad_filter={self.grad_filter}" if self.grad_filter else ""
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}{extra}"
