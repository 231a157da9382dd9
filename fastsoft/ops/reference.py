"""Pure-PyTorch reference of the fused softmax-KL loss: ground truth in tests, last fallback at run time.

Chunked over tokens: at most one chunk of logits ``[C, V]`` (and a few same-sized temporaries) is
alive at a time, never the whole ``[N, V]``. Computes in fp32 (fp64 when any input is fp64, which is
how the tests build their ground truth). The maths and the gradient are in ``kernels/softmax_kl.md``.
"""

from __future__ import annotations

import math

import torch

from fastsoft.ops.targets import (
    DIVERGENCES,  # noqa: F401  (read here by older callers; defined with the target types)
    CompactTarget,
    HiddenTarget,
    SparseTarget,
    Teacher,
    as_target,
    check_divergence,
    check_grad_filter,
)

# Bytes of one [C, V] temporary; the chunk loop keeps about five of them alive.
CHUNK_BYTES = 16 * 2**20
# Vocabulary columns per tile of the gradient filter (the C++ backend's BV).
FILTER_TILE = 256


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _dense_rows(logp: torch.Tensor, q_logits: torch.Tensor, temperature: float):
    """KL(q || p) per row and dL/dz, for a dense teacher given as (unnormalised) logits or log-probs."""
    q_log = torch.log_softmax(q_logits / temperature, dim=-1)  # [C, V]
    q = q_log.exp()
    loss = torch.where(q > 0, q * (q_log - logp), torch.zeros_like(q)).sum(-1)
    dz = logp.exp() - q  # sum(q) = 1
    return loss, dz


def _divergence_rows(logp: torch.Tensor, q_logits: torch.Tensor, temperature: float, divergence: str, beta: float):
    """Reverse KL(p || q) or JSD_beta(q, p) per row and dL/dz, for a dense teacher (logits or log-probs).

    Not linear in the teacher: both full distributions are used. ``0 log 0 = 0``; a student entry ``p_v > 0``
    where ``q_v = 0`` makes the reverse KL ``+inf`` (correct), and such a row gets gradient 0, never NaN.
    """
    logq = torch.log_softmax(q_logits / temperature, dim=-1)  # [C, V]
    p = logp.exp()
    zero = torch.zeros_like(p)
    if divergence == "reverse":
        g = torch.where(p > 0, logp - logq, zero)  # +inf where p > 0 = q
        loss = (p * g).sum(-1)
        finite = torch.isfinite(loss)
        # sum p g / sum p, not the loss, in the gradient: sum_v dz_v = 0 to rounding even when sum p is not 1
        mean_g = loss[:, None] / p.sum(-1, keepdim=True)
        dz = torch.where(finite[:, None] & (p > 0), p * (g - mean_g), zero)
        return loss, dz
    logm = torch.logaddexp(math.log(beta) + logq, math.log1p(-beta) + logp)
    q = logq.exp()
    g = torch.where(p > 0, logp - logm, zero)
    big_g = (p * g).sum(-1)
    loss = beta * torch.where(q > 0, q * (logq - logm), zero).sum(-1) + (1 - beta) * big_g
    dz = (1 - beta) * p * (g - big_g[:, None] / p.sum(-1, keepdim=True))
    return loss, dz


def _sparse_rows(z: torch.Tensor, lse: torch.Tensor, target: SparseTarget):
    """Cross-entropy against a sparse measure w (plus the optional tail bucket) and dL/dz."""
    ids = target.ids.long()  # [C, K]
    w = target.probs.to(z.dtype)  # [C, K]
    logp = z - lse[:, None]
    logp_k = logp.gather(1, ids)  # [C, K]
    loss = (torch.xlogy(w, w) - w * logp_k).sum(-1)
    w_sum = w.sum(-1)
    p = logp.exp()
    dz = p * w_sum[:, None]
    if target.tail is not None:
        r = target.tail.to(z.dtype)  # [C]
        in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
        # log P_tail = logsumexp over the ids outside the top-k, minus lse: exact, no 1 - sum cancellation.
        log_p_tail = torch.logsumexp(z.masked_fill(in_topk, float("-inf")), dim=-1) - lse
        has_tail = r > 0
        loss = loss + torch.where(has_tail, torch.xlogy(r, r) - r * log_p_tail, torch.zeros_like(r))
        ratio = torch.where(has_tail, r * torch.exp(-log_p_tail), torch.zeros_like(r))  # r / P_tail
        dz = dz + p * (r[:, None] - ratio[:, None] * (~in_topk).to(z.dtype))
    dz = dz.scatter_add(1, ids, -w)
    return loss, dz


def softmax_kl_rows(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher: Teacher,
    temperature: float,
    token_weight: torch.Tensor | None,
    need_grad: bool,
    divergence: str = "forward",
    beta: float = 0.5,
    grad_filter: tuple[torch.Tensor, float] | None = None,
):
    """Per-row losses and per-row input gradients; the backend contract of ``fastsoft.ops.softmax_kl``.

    Args:
        hidden: ``[N, H]`` student final hidden states.
        lm_weight: ``[V, H]`` frozen lm_head weight (no gradient for it is ever computed).
        teacher: dense log-probs ``[N, V]``, a :class:`SparseTarget`, a :class:`HiddenTarget` or a
            :class:`CompactTarget` (built at ``temperature``; ``softmax_kl`` checks that).
        temperature: student (and dense/hidden teacher) logits are divided by it.
        token_weight: ``[N]`` or None; rows whose weight is 0 give loss 0 and gradient 0, and their
            teacher row is never trusted (NaN there does not leak).
        need_grad: also return ``d loss_n / d hidden_n``.
        divergence: ``"forward"`` (KL(q || p), every teacher kind), ``"reverse"`` (KL(p || q)) or ``"jsd"``
            (``JSD_beta(q, p)``); the last two need a target type that serves them (its ``DIVERGENCES``).
        beta: the JSD mixing weight of the teacher, in (0, 1).
        grad_filter: None, or ``(wnorm [V], scale)`` with ``wnorm[v] = ||lm_weight[v]||`` (a target type and
            divergence in its ``GRAD_FILTER``: compact, forward; ``need_grad`` only): a tile of :data:`FILTER_TILE`
            vocabulary columns is left out of ``dz @ W`` for a chunk of rows when every row's mass there times the
            tile's largest ``wnorm`` is at most ``scale * columns``.

    Returns:
        ``loss [N]`` fp32 (fp64 for fp64 inputs; unweighted per-row loss) and ``grad [N, H]`` in ``hidden.dtype`` or None;
        with ``grad_filter`` also ``dropped [N]`` (per row ``sum_{skipped v} p_v ||W_v|| / T``, a bound of the norm of
        what was left out of the gradient) and ``skipped``, the share of (row, column) products left out (0-dim).
    """
    teacher = as_target(teacher)
    check_divergence(teacher, divergence)
    if grad_filter is not None:
        check_grad_filter(teacher, divergence, need_grad)
    n, _ = hidden.shape
    cd = _compute_dtype(hidden, lm_weight)
    loss_out = torch.zeros(n, dtype=cd, device=hidden.device)
    grad_out = torch.zeros_like(hidden) if need_grad else None
    dropped = torch.zeros(n, dtype=cd, device=hidden.device)
    skipped = torch.zeros((), dtype=torch.float64)
    if n == 0:
        return (loss_out, grad_out) if grad_filter is None else (loss_out, grad_out, dropped, skipped.float())
    weight = lm_weight.to(cd)
    vocab = weight.shape[0]
    chunk = max(1, CHUNK_BYTES // (vocab * torch.finfo(cd).bits // 8))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        z = (hidden[rows].to(cd) @ weight.T) / temperature  # [C, V]
        lse = torch.logsumexp(z, dim=-1)
        compact = None
        if isinstance(teacher, SparseTarget):
            loss, dz = _sparse_rows(z, lse, teacher[rows])
        elif isinstance(teacher, CompactTarget):
            # cross-entropy-shaped: sum q log q - h . wbar / T + lse, dz = p (the teacher's -wbar is added after the GEMM)
            compact = teacher.wbar[rows].to(cd)  # [C, H]
            dot = (hidden[rows].to(cd) * compact).sum(-1)
            loss = teacher.neg_entropy[rows].to(cd) - dot / temperature + lse
            dz = (z - lse[:, None]).exp()
        elif divergence != "forward":
            if isinstance(teacher, HiddenTarget):
                q_logits = teacher.hidden[rows].to(cd) @ weight.T
            else:
                q_logits = teacher.logprobs[rows].to(cd)
            loss, dz = _divergence_rows(torch.log_softmax(z, -1), q_logits, temperature, divergence, beta)
        elif isinstance(teacher, HiddenTarget):
            loss, dz = _dense_rows(z - lse[:, None], teacher.hidden[rows].to(cd) @ weight.T, temperature)
        else:
            loss, dz = _dense_rows(z - lse[:, None], teacher.logprobs[rows].to(cd), temperature)
        keep = None if token_weight is None else token_weight[rows] != 0
        if keep is not None:
            loss = torch.where(keep, loss, torch.zeros_like(loss))
            dz = torch.where(keep[:, None], dz, torch.zeros_like(dz))
        loss_out[rows] = loss
        if grad_filter is not None:
            dz, dropped[rows], count = _filter_tiles(dz, keep, *grad_filter, temperature)
            skipped += count
        if need_grad:
            dh = dz @ weight
            if compact is not None:
                dh = dh - (compact if keep is None else torch.where(keep[:, None], compact, torch.zeros_like(compact)))
            grad_out[rows] = (dh / temperature).to(hidden.dtype)
    if grad_filter is None:
        return loss_out, grad_out
    return loss_out, grad_out, dropped, (skipped / (n * vocab)).float()


def _filter_tiles(dz: torch.Tensor, keep, wnorm: torch.Tensor, scale: float, temperature: float):
    """``dz [C, V]`` with the skippable tiles zeroed, the per-row bound of what they held, the count zeroed."""
    c, vocab = dz.shape
    wn = wnorm.to(dz)
    live = torch.ones(c, dtype=torch.bool, device=dz.device) if keep is None else keep
    dropped = torch.zeros(c, dtype=dz.dtype, device=dz.device)
    count = 0
    for v0 in range(0, vocab, FILTER_TILE):
        cols = slice(v0, min(vocab, v0 + FILTER_TILE))
        tile = dz[:, cols]
        mass = tile.abs().sum(-1)  # [C]
        width = tile.shape[1]
        if bool(((mass * wn[cols].max()) <= scale * width)[live].all()):
            dropped += tile.abs() @ wn[cols]
            dz[:, cols] = 0
            count += c * width
    return dz, dropped / temperature, count


def softmax_kl_naive(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher: Teacher,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
) -> torch.Tensor:
    """The loss written plainly, unfused and unchunked: per-row ``L_n`` ``[N]``, differentiable by autograd.

    ``divergence``: ``"forward"`` KL(q || p), ``"reverse"`` KL(p || q) or ``"jsd"``
    ``beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = beta q + (1 - beta) p`` (dense and hidden teachers only).

    The ground truth of the tests (in fp64) and the "torch eager" provider of the benchmarks. Logits are
    formed in the inputs' dtype and the softmax runs in at least fp32. Memory: several ``[N, V]`` tensors.
    """
    teacher = as_target(teacher)
    check_divergence(teacher, divergence)
    z = hidden @ lm_weight.T
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(z, -1)
    if isinstance(teacher, SparseTarget):
        w, ids = teacher.probs.to(z.dtype), teacher.ids.long()
        loss = (torch.xlogy(w, w) - w * logp.gather(1, ids)).sum(-1)
        if teacher.tail is not None:
            r = teacher.tail.to(z.dtype)
            outside = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)
            loss = loss + torch.xlogy(r, r) - r * outside
        return loss
    if isinstance(teacher, CompactTarget):
        dot = (hidden.to(z.dtype) * teacher.wbar.to(z.dtype)).sum(-1)
        return teacher.neg_entropy.to(z.dtype) - dot / temperature + torch.logsumexp(z, -1)
    logits = teacher.hidden.to(lm_weight.dtype) @ lm_weight.T if isinstance(teacher, HiddenTarget) else teacher.logprobs
    q = torch.log_softmax(logits.to(z.dtype) / temperature, -1)
    if divergence == "reverse":
        return (logp.exp() * (logp - q)).sum(-1)
    if divergence == "jsd":
        logm = torch.logaddexp(math.log(beta) + q, math.log1p(-beta) + logp)
        teacher_term = torch.where(q > float("-inf"), q.exp() * (q - logm), torch.zeros_like(q))  # 0 log 0 = 0
        return beta * teacher_term.sum(-1) + (1 - beta) * (logp.exp() * (logp - logm)).sum(-1)
    return (q.exp() * (q - logp)).sum(-1)
