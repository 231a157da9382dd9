"""Triton backend of ``softmax_kl``: lm_head GEMM + streaming softmax + KL/cross-entropy + input gradient.

Implements the row contract of ``fastsoft.ops.reference.softmax_kl_rows`` (the ground truth). The maths
(tile statistics, their merge, the gradient of every target kind) and the tiling plan are written
once in ``kernels/softmax_kl.md``; comments here only say why.

Per token chunk of ``C`` rows, three launches (no host sync anywhere, CUDA-graph safe):

1. ``_softmax_kl_fwd_kernel``  z = h W^T / T tile by tile; epilogue: per (row, 128-wide vocab tile)
   softmax statistics of the student and the teacher, the in-tile exponentials ``e = exp(z - m_tile)``
   (and the teacher's ``f``) kept in a ``[C, V]`` buffer (fp16 for 16-bit inputs, fp32 for fp32);
   sparse targets: the student logits at the target ids and the in-tile mass outside them.
2. ``_softmax_kl_row_kernel``  merges the tile statistics of one row: lse, loss, and turns each
   tile's max into the scale that makes ``e`` a gradient: ``dz = e * c_tile - f * d_tile``.
3. ``_softmax_kl_bwd_kernel``  dh = (1/T) dz W with ``dz`` formed in registers from the buffer (no
   exponentials), sparse-id corrections added from gathered W rows after the main loop, optional split
   over V for small chunks; for the compact teacher, an optional bounded filter (``grad_filter``) that skips
   tiles whose contribution is provably small and returns the per-row bound of what it left out.

Never materialises ``[N, V]`` logits; no gradient for ``W``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fastsoft.ops.targets import (
    CompactTarget,
    HiddenTarget,
    SparseTarget,
    as_target,
    check_divergence,
    check_grad_filter,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Teacher kinds (constexpr TEACHER). COMPACT (wbar, sum q log q) runs the sparse path with no ids: the loss adds
# neg_entropy - h . wbar / T (row kernel), the gradient -wbar / T (backward kernel, first vocabulary split).
DENSE, HIDDEN, SPARSE, COMPACT = 0, 1, 2, 3
# The backward kernel's kind for the reverse KL / JSD: its buffer already holds dL/dz (scale 1, no teacher term).
DIVERGENCE = 4
# Dtype codes for tl.dot operands (constexpr DOT).
_DOT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Width of the vocabulary tiles the statistics are kept per; the forward kernel's BV equals it and the
# backward kernel's BV divides it.
BV_STATS = 64 if INTERPRET else 128
# Stats slots: student max (then gradient scale), student sum, teacher max (then scale) or max outside the
# sparse ids, teacher sum or sum outside the ids, teacher cross term.
_SLOTS = {DENSE: 5, HIDDEN: 5, SPARSE: 4, COMPACT: 2, DIVERGENCE: 5}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BN": 16, "BH": 64}, num_warps=4)]
    return [
        triton.Config({"BN": BN, "BH": BH}, num_warps=w, num_stages=s)
        for BN, BH, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3), (64, 128, 4, 3)]
    ]


def _bwd_configs():
    if INTERPRET:
        return [triton.Config({"BN": 16, "BH": 64, "BV": 32}, num_warps=4)]  # BV < BV_STATS: the divisor path
    return [
        triton.Config({"BN": BN, "BH": BH, "BV": BV}, num_warps=w, num_stages=s)
        for BN, BH, BV, w, s in [
            (128, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 256, 64, 8, 3),
            (64, 64, 128, 4, 4),
        ]
    ]


@triton.jit
def _to_dot(x, DOT: tl.constexpr):
    if DOT == 0:
        return x.to(tl.float32)
    elif DOT == 1:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def _lower_bound(ids_ptr, o_n, m_n, K, target, LOG2K: tl.constexpr):
    """Per row, the first position in the sorted ids whose id is >= target."""
    lo = tl.zeros_like(o_n)
    hi = tl.zeros_like(o_n) + K
    for _ in tl.static_range(LOG2K + 1):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(ids_ptr + o_n * K + mid, mask=m_n & active, other=0)
        right = active & (val < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (val >= target), mid, hi)
    return lo


@triton.autotune(configs=_fwd_configs(), key=["V", "H", "TEACHER", "HAS_TAIL", "STORE", "LOGITS"])
@triton.jit
def _softmax_kl_fwd_kernel(
    h_ptr,
    w_ptr,
    t_ptr,
    tw_ptr,
    ids_ptr,
    zk_ptr,
    e_ptr,
    f_ptr,
    stats_ptr,
    C,
    V,
    H,
    K,
    NVT,
    SS,
    inv_temp,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_tn,
    stride_tc,
    stride_tw,
    stride_en,
    TEACHER: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    STORE: tl.constexpr,
    LOG2K: tl.constexpr,
    DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    LOGITS: tl.constexpr = False,
):
    i_p = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(C, BN)
    i_n = i_p % num_n  # row blocks fastest: consecutive programs share the W tile
    i_v = i_p // num_n
    o_n = i_n * BN + tl.arange(0, BN).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV).to(tl.int64)
    m_n = o_n < C
    m_v = o_v < V

    b_z = tl.zeros([BN, BV], dtype=tl.float32)
    if TEACHER == 1:
        b_a = tl.zeros([BN, BV], dtype=tl.float32)
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)
        m_h = o_h < H
        p_w = w_ptr + o_v[None, :] * stride_wv + o_h[:, None] * stride_wh
        b_w = _to_dot(tl.load(p_w, mask=m_h[:, None] & m_v[None, :], other=0.0), DOT)  # [BH, BV]
        p_h = h_ptr + o_n[:, None] * stride_hn + o_h[None, :] * stride_hh
        b_h = _to_dot(tl.load(p_h, mask=m_n[:, None] & m_h[None, :], other=0.0), DOT)  # [BN, BH]
        b_z = tl.dot(b_h, b_w, b_z, input_precision=DOT_PRECISION)
        if TEACHER == 1:
            p_t = t_ptr + o_n[:, None] * stride_tn + o_h[None, :] * stride_tc
            b_t = _to_dot(tl.load(p_t, mask=m_n[:, None] & m_h[None, :], other=0.0), DOT)  # [BN, BH]
            b_a = tl.dot(b_t, b_w, b_a, input_precision=DOT_PRECISION)

    if HAS_WEIGHT:
        b_keep = m_n & (tl.load(tw_ptr + o_n * stride_tw, mask=m_n, other=0.0) != 0)
    else:
        b_keep = m_n
    b_z = tl.where(m_v[None, :], b_z * inv_temp, float("-inf"))  # [BN, BV]
    b_m = tl.max(b_z, 1)  # [BN]
    b_e = tl.exp(b_z - b_m[:, None])  # [BN, BV]
    o_st = o_n * NVT + i_v
    tl.store(stats_ptr + o_st, b_m, mask=m_n)
    tl.store(stats_ptr + SS + o_st, tl.sum(b_e, 1), mask=m_n)
    p_e = o_n[:, None] * stride_en + o_v[None, :]
    m_e = m_n[:, None] & m_v[None, :]
    if STORE and TEACHER != 2:
        # ignored rows may hold NaN teachers: store zeros so the gradient pass multiplies 0 by 0
        # (LOGITS, for the reverse KL / JSD: the tempered logits themselves, read back with the final lse)
        b_keep_e = tl.where(b_keep[:, None], b_z if LOGITS else b_e, 0.0)
        tl.store(e_ptr + p_e, b_keep_e.to(e_ptr.dtype.element_ty), mask=m_e)

    if TEACHER < 2:
        if TEACHER == 0:
            p_t = t_ptr + o_n[:, None] * stride_tn + o_v[None, :] * stride_tc
            b_a = tl.load(p_t, mask=m_e, other=0.0).to(tl.float32)  # [BN, BV]
        b_a = tl.where(m_v[None, :], b_a * inv_temp, float("-inf"))
        b_mt = tl.max(b_a, 1)  # [BN]
        b_f = tl.exp(b_a - tl.where(b_mt == float("-inf"), 0.0, b_mt)[:, None])  # [BN, BV]
        b_x = tl.sum(tl.where(b_f > 0, b_f * (b_a - b_z), 0.0), 1)  # sum_v f_v (a_v - z_v); q_v = 0 adds 0
        tl.store(stats_ptr + 2 * SS + o_st, b_mt, mask=m_n)
        tl.store(stats_ptr + 3 * SS + o_st, tl.sum(b_f, 1), mask=m_n)
        tl.store(stats_ptr + 4 * SS + o_st, b_x, mask=m_n)
        if STORE:
            b_keep_f = tl.where(b_keep[:, None], b_a if LOGITS else b_f, 0.0)
            tl.store(f_ptr + p_e, b_keep_f.to(f_ptr.dtype.element_ty), mask=m_e)
    elif TEACHER == 2:
        # walk this row's sorted ids that fall in the tile: pick z at them, mark them for the tail sum
        v_end = (i_v + 1) * BV
        b_ptr = _lower_bound(ids_ptr, o_n, b_keep, K, i_v * BV, LOG2K)  # [BN]
        b_nxt = tl.load(ids_ptr + o_n * K + b_ptr, mask=b_keep & (b_ptr < K), other=2147483647).to(tl.int64)
        b_in = tl.zeros([BN, BV], dtype=tl.int1)
        while tl.max((b_nxt < v_end).to(tl.int32), 0) > 0:
            b_hit = b_nxt < v_end
            b_eq = o_v[None, :] == b_nxt[:, None]  # [BN, BV]
            b_in = b_in | b_eq
            tl.store(zk_ptr + o_n * K + b_ptr, tl.sum(tl.where(b_eq, b_z, 0.0), 1), mask=b_hit)
            b_ptr += b_hit.to(tl.int64)
            b_nxt = tl.load(ids_ptr + o_n * K + b_ptr, mask=b_keep & (b_ptr < K), other=2147483647).to(tl.int64)
        if STORE:
            # the ids' entries are left to the exact corrections of the gradient pass (no cancellation)
            b_e = tl.where(b_in | ~b_keep[:, None], 0.0, b_e)
            tl.store(e_ptr + p_e, b_e.to(e_ptr.dtype.element_ty), mask=m_e)
        if HAS_TAIL:
            # the mass outside the ids gets its own max: exact even when the ids hold nearly everything
            b_zt = tl.where(b_in, float("-inf"), b_z)  # [BN, BV]
            b_mt = tl.max(b_zt, 1)
            b_st = tl.sum(tl.exp(b_zt - tl.where(b_mt == float("-inf"), 0.0, b_mt)[:, None]), 1)
            tl.store(stats_ptr + 2 * SS + o_st, b_mt, mask=m_n)
            tl.store(stats_ptr + 3 * SS + o_st, b_st, mask=m_n)


@triton.jit
def _softmax_kl_row_kernel(
    stats_ptr,
    loss_ptr,
    tw_ptr,
    ids_ptr,
    wk_ptr,
    zk_ptr,
    corr_ptr,
    tail_ptr,
    h_ptr,
    t_ptr,
    K,
    NVT,
    SS,
    H,
    inv_temp,
    stride_tw,
    stride_hn,
    stride_hh,
    stride_tn,
    stride_tc,
    TEACHER: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    if HAS_WEIGHT:
        keep = tl.load(tw_ptr + i_n * stride_tw) != 0
    else:
        keep = i_n >= 0
    p_m = stats_ptr + i_n * NVT
    p_s = stats_ptr + SS + i_n * NVT
    p_2 = stats_ptr + 2 * SS + i_n * NVT

    # pass 1: maxima over the tiles
    b_mx = tl.full([BT], float("-inf"), tl.float32)
    b_mtx = tl.full([BT], float("-inf"), tl.float32)
    for j0 in range(0, NVT, BT):
        o_j = j0 + tl.arange(0, BT)
        m_j = o_j < NVT
        b_mx = tl.maximum(b_mx, tl.load(p_m + o_j, mask=m_j, other=float("-inf")))
        if TEACHER < 2 or HAS_TAIL:
            b_mtx = tl.maximum(b_mtx, tl.load(p_2 + o_j, mask=m_j, other=float("-inf")))
    mx = tl.max(b_mx, 0)
    mtx = tl.max(b_mtx, 0)
    mtx_safe = tl.where(mtx == float("-inf"), 0.0, mtx)

    # pass 2: sums rescaled to the row maxima
    b_s = tl.zeros([BT], tl.float32)
    b_st = tl.zeros([BT], tl.float32)
    b_x = tl.zeros([BT], tl.float32)
    for j0 in range(0, NVT, BT):
        o_j = j0 + tl.arange(0, BT)
        m_j = o_j < NVT
        b_scale = tl.exp(tl.load(p_m + o_j, mask=m_j, other=float("-inf")) - mx)
        b_s += tl.load(p_s + o_j, mask=m_j, other=0.0) * b_scale
        if TEACHER < 2:
            b_tscale = tl.exp(tl.load(p_2 + o_j, mask=m_j, other=float("-inf")) - mtx_safe)
            b_st += tl.load(stats_ptr + 3 * SS + i_n * NVT + o_j, mask=m_j, other=0.0) * b_tscale
            b_x += tl.load(stats_ptr + 4 * SS + i_n * NVT + o_j, mask=m_j, other=0.0) * b_tscale
        elif TEACHER == 2 and HAS_TAIL:
            b_tscale = tl.exp(tl.load(p_2 + o_j, mask=m_j, other=float("-inf")) - mtx_safe)
            b_st += tl.load(stats_ptr + 3 * SS + i_n * NVT + o_j, mask=m_j, other=0.0) * b_tscale
    lse = mx + tl.log(tl.sum(b_s, 0))

    gamma = 1.0  # dz = gamma * p - (teacher part)
    if TEACHER < 2:
        s_t = tl.sum(b_st, 0)
        lse_t = mtx + tl.log(s_t)
        loss = tl.sum(b_x, 0) / s_t - lse_t + lse
    elif TEACHER == 3:
        # cross-entropy-shaped: sum q log q (in tail_ptr) - h . wbar / T + lse; an ignored row's NaN is dropped by
        # the final tl.where
        b_dot = tl.zeros([BT], tl.float32)
        for j0 in range(0, H, BT):
            o_j = j0 + tl.arange(0, BT)
            m_j = o_j < H
            b_h = tl.load(h_ptr + i_n * stride_hn + o_j * stride_hh, mask=m_j, other=0.0).to(tl.float32)
            b_t = tl.load(t_ptr + i_n * stride_tn + o_j * stride_tc, mask=m_j, other=0.0).to(tl.float32)
            b_dot += b_h * b_t
        nq = tl.load(tail_ptr + i_n).to(tl.float32)
        loss = nq - tl.sum(b_dot, 0) * inv_temp + lse
    else:
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        b_w = tl.load(wk_ptr + i_n * K + o_k, mask=m_k, other=0.0)  # [BK]
        b_lp = tl.load(zk_ptr + i_n * K + o_k, mask=m_k, other=0.0) - lse  # log p at the ids
        loss = tl.sum(tl.where(b_w > 0, b_w * tl.log(tl.where(b_w > 0, b_w, 1.0)), 0.0) - b_w * b_lp, 0)
        gamma = tl.sum(b_w, 0)
        alpha = gamma
        beta = 0.0
        if HAS_TAIL:
            r = tl.load(tail_ptr + i_n)
            log_tail = mtx + tl.log(tl.sum(b_st, 0)) - lse  # log P_tail from the tail itself, no 1 - sum(p_k)
            has_tail = r > 0
            loss += tl.where(has_tail, r * tl.log(tl.where(has_tail, r, 1.0)) - r * log_tail, 0.0)
            beta = tl.where(has_tail, r * tl.exp(-log_tail), 0.0)  # r / P_tail
            alpha = gamma + r
            gamma = alpha - beta
        if NEED_GRAD:
            # dz at the ids, whole: alpha p - w (p counted once for a repeated id; the ids are sorted)
            b_prev = tl.load(ids_ptr + i_n * K + o_k - 1, mask=m_k & (o_k > 0), other=-1)
            b_first = tl.load(ids_ptr + i_n * K + o_k, mask=m_k, other=-1) != b_prev
            b_corr = tl.where(b_first, alpha * tl.exp(b_lp), 0.0) - b_w
            tl.store(corr_ptr + i_n * K + o_k, tl.where(keep, b_corr, 0.0), mask=m_k)
    tl.store(loss_ptr + i_n, tl.where(keep, loss, 0.0))

    if NEED_GRAD:
        # pass 3: tile maxima become gradient scales (0 for ignored rows)
        for j0 in range(0, NVT, BT):
            o_j = j0 + tl.arange(0, BT)
            m_j = o_j < NVT
            b_c = gamma * tl.exp(tl.load(p_m + o_j, mask=m_j, other=float("-inf")) - lse)
            tl.store(p_m + o_j, tl.where(keep, b_c, 0.0), mask=m_j)
            if TEACHER < 2:
                b_d = tl.exp(tl.load(p_2 + o_j, mask=m_j, other=float("-inf")) - lse_t)
                tl.store(p_2 + o_j, tl.where(keep, b_d, 0.0), mask=m_j)


@triton.jit
def _divergence_tile(p_z, p_a, o_v, m_v, m_z, ls_z, m_a, ls_a, log_beta, log_1mb, JSD: tl.constexpr):
    """One vocabulary tile of a row for reverse KL / JSD: log p, log q, p, g and (JSD) log m, where g is the
    per-entry term whose p-weighted sum is the loss: log p - log q (0 where p = 0 or q = 0), or log p - log m."""
    b_lp = (tl.load(p_z + o_v, mask=m_v, other=float("-inf")) - m_z) - ls_z
    b_lq = (tl.load(p_a + o_v, mask=m_v, other=float("-inf")) - m_a) - ls_a
    b_p = tl.exp(b_lp)
    live = b_p > 0
    if JSD:
        b_x = log_beta + b_lq
        b_y = log_1mb + b_lp
        b_hi = tl.maximum(b_x, b_y)
        b_lm = b_hi + tl.log(1.0 + tl.exp(tl.minimum(b_x, b_y) - b_hi))  # logaddexp; NaN only where p = q = 0
        b_g = tl.where(live, b_lp - b_lm, 0.0)
    else:
        b_lm = b_lq
        b_g = tl.where(live & (b_lq > float("-inf")), b_lp - b_lq, 0.0)
    return b_lp, b_lq, b_p, b_g, b_lm


@triton.jit
def _divergence_row_kernel(
    z_ptr,
    a_ptr,
    lse_ptr,
    loss_ptr,
    tw_ptr,
    V,
    stride_en,
    stride_tw,
    beta,
    log_beta,
    log_1mb,
    JSD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BT: tl.constexpr,
):
    """Reverse KL or JSD of one row from its stored tempered logits z, a and final (max, log sum) of each softmax
    (kernels/softmax_kl.md §2b); with NEED_GRAD, overwrites z by dL/dz = c p (g - sum p g / sum p), which the
    backward kernel multiplies by W."""
    i_n = tl.program_id(0).to(tl.int64)
    if HAS_WEIGHT:
        keep = tl.load(tw_ptr + i_n * stride_tw) != 0
    else:
        keep = i_n >= 0
    m_z = tl.load(lse_ptr + 4 * i_n)
    ls_z = tl.load(lse_ptr + 4 * i_n + 1)
    m_a = tl.load(lse_ptr + 4 * i_n + 2)
    ls_a = tl.load(lse_ptr + 4 * i_n + 3)
    p_z = z_ptr + i_n * stride_en
    p_a = a_ptr + i_n * stride_en
    b_sp = tl.zeros([BT], tl.float32)
    b_spg = tl.zeros([BT], tl.float32)
    b_stq = tl.zeros([BT], tl.float32)
    b_inf = tl.zeros([BT], tl.int32)
    for v0 in range(0, V, BT):
        o_v = v0 + tl.arange(0, BT)
        m_v = o_v < V
        b_lp, b_lq, b_p, b_g, b_lm = _divergence_tile(
            p_z, p_a, o_v, m_v, m_z, ls_z, m_a, ls_a, log_beta, log_1mb, JSD
        )  # [BT] each
        live = b_p > 0
        if JSD:
            b_q = tl.exp(b_lq)
            b_stq += tl.where(b_q > 0, b_q * (b_lq - b_lm), 0.0)
        else:  # p > 0 = q: the row is +inf (g is kept finite)
            b_inf = tl.maximum(b_inf, tl.where(live & (b_lq == float("-inf")), 1, 0))
        b_sp += b_p
        b_spg += tl.where(live, b_p * b_g, 0.0)
    sp = tl.sum(b_sp, 0)
    spg = tl.sum(b_spg, 0)
    infinite = tl.max(b_inf, 0) > 0
    if JSD:
        loss = beta * tl.sum(b_stq, 0) + (1.0 - beta) * spg
        c = 1.0 - beta
    else:
        loss = tl.where(infinite, float("inf"), spg)
        c = 1.0
    tl.store(loss_ptr + i_n, tl.where(keep, loss, 0.0))
    if NEED_GRAD:
        mean_g = spg / sp  # not the loss: then sum_v dz_v = 0 to rounding even though sum p is not exactly 1
        c = tl.where(keep, tl.where(infinite, 0.0, c), 0.0)  # ignored and infinite rows: gradient 0
        for v0 in range(0, V, BT):
            o_v = v0 + tl.arange(0, BT)
            m_v = o_v < V
            b_lp, b_lq, b_p, b_g, b_lm = _divergence_tile(
                p_z, p_a, o_v, m_v, m_z, ls_z, m_a, ls_a, log_beta, log_1mb, JSD
            )  # [BT] each
            live = b_p > 0
            b_c = tl.zeros([BT], tl.float32) + c
            b_dz = tl.where(live & (b_c != 0), b_c * b_p * (b_g - mean_g), 0.0)  # never 0 * NaN
            tl.store(p_z + o_v, b_dz, mask=m_v)


@triton.autotune(configs=_bwd_configs(), key=["V", "H", "TEACHER", "FILTER"])
@triton.jit
def _softmax_kl_bwd_kernel(
    e_ptr,
    f_ptr,
    stats_ptr,
    w_ptr,
    g_ptr,
    ids_ptr,
    corr_ptr,
    tw_ptr,
    t_ptr,
    C,
    V,
    H,
    K,
    NVT,
    SS,
    V_SPLIT,
    inv_temp,
    filter_scale,
    wnorm_ptr,
    drop_ptr,
    cnt_ptr,
    stride_ds,
    stride_en,
    stride_wv,
    stride_wh,
    stride_gs,
    stride_gn,
    stride_gh,
    stride_tw,
    stride_tn,
    stride_tc,
    TEACHER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    FILTER: tl.constexpr,
    LOG2K: tl.constexpr,
    BV_STATS: tl.constexpr,
    DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BH: tl.constexpr,
    BV: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    num_h = tl.cdiv(H, BH)
    i_h = i_p % num_h  # H tiles fastest: consecutive programs share the dz rows
    i_n = i_p // num_h
    o_n = i_n * BN + tl.arange(0, BN).to(tl.int64)
    o_h = i_h * BH + tl.arange(0, BH).to(tl.int64)
    m_n = o_n < C
    m_h = o_h < H
    v_start = i_s * V_SPLIT
    v_stop = tl.minimum(v_start + V_SPLIT, V)

    b_acc = tl.zeros([BN, BH], dtype=tl.float32)
    if FILTER:
        b_drop = tl.zeros([BN], dtype=tl.float32)  # sum over skipped tiles of |dz| ||W_v||, per row
        b_cnt = tl.zeros([BN], dtype=tl.float32)  # vocabulary columns skipped, per row
        thr = filter_scale * BV
    for v0 in range(v_start, v_stop, BV):
        o_v = v0 + tl.arange(0, BV).to(tl.int64)
        m_v = o_v < v_stop
        m_e = m_n[:, None] & m_v[None, :]
        p_e = o_n[:, None] * stride_en + o_v[None, :]
        o_st = o_n * NVT + v0 // BV_STATS
        b_c = tl.load(stats_ptr + o_st, mask=m_n, other=0.0)  # [BN]
        b_dz = tl.load(e_ptr + p_e, mask=m_e, other=0.0).to(tl.float32) * b_c[:, None]  # [BN, BV]
        if TEACHER < 2:
            b_d = tl.load(stats_ptr + 2 * SS + o_st, mask=m_n, other=0.0)  # [BN]
            b_dz -= tl.load(f_ptr + p_e, mask=m_e, other=0.0).to(tl.float32) * b_d[:, None]
        p_w = w_ptr + o_v[:, None] * stride_wv + o_h[None, :] * stride_wh
        if FILTER:
            # bounded gradient filter (kernels/softmax_kl.md §6): the tile is skipped when every row's
            # sum_v |dz| times the tile's max ||W_v|| is <= scale * BV; what it would have added to a row is at most
            # sum_v |dz_v| ||W_v|| (triangle inequality), summed into b_drop. The same decisions in every i_h program.
            b_wn = tl.load(wnorm_ptr + o_v, mask=m_v, other=0.0)  # [BV]
            b_adz = tl.abs(b_dz)  # [BN, BV]
            b_row = tl.sum(b_adz, 1) * tl.max(b_wn, 0)  # [BN]
            if tl.max(tl.where(b_row <= thr, 0, 1), 0) > 0:  # some row above the threshold (or NaN): keep
                b_w = _to_dot(tl.load(p_w, mask=m_v[:, None] & m_h[None, :], other=0.0), DOT)  # [BV, BH]
                b_acc = tl.dot(_to_dot(b_dz, DOT), b_w, b_acc, input_precision=DOT_PRECISION)
            else:
                b_drop += tl.sum(b_adz * b_wn[None, :], 1)
                b_cnt += tl.where(m_n, tl.minimum(v_stop - v0, BV).to(tl.float32), 0.0)
        else:
            b_w = _to_dot(tl.load(p_w, mask=m_v[:, None] & m_h[None, :], other=0.0), DOT)  # [BV, BH]
            b_acc = tl.dot(_to_dot(b_dz, DOT), b_w, b_acc, input_precision=DOT_PRECISION)
    if TEACHER == 2:
        # dz at this split's ids (alpha p_k - w_k; the main loop saw 0 there): gathered W rows, fp32 FMAs,
        # after the main loop so that loop stays a plain software-pipelined GEMM
        if HAS_WEIGHT:
            b_keep = m_n & (tl.load(tw_ptr + o_n * stride_tw, mask=m_n, other=0.0) != 0)
        else:
            b_keep = m_n
        b_lo = _lower_bound(ids_ptr, o_n, b_keep, K, v_start, LOG2K)  # [BN]
        b_hi = tl.where(b_keep, _lower_bound(ids_ptr, o_n, b_keep, K, v_stop, LOG2K), b_lo)
        b_k = b_lo
        while tl.max((b_k < b_hi).to(tl.int32), 0) > 0:
            b_hit = b_k < b_hi
            b_id = tl.load(ids_ptr + o_n * K + b_k, mask=b_hit, other=0).to(tl.int64)  # in [v_start, v_stop)
            b_corr = tl.load(corr_ptr + o_n * K + b_k, mask=b_hit, other=0.0)  # [BN]
            p_r = w_ptr + b_id[:, None] * stride_wv + o_h[None, :] * stride_wh
            b_r = tl.load(p_r, mask=b_hit[:, None] & m_h[None, :], other=0.0).to(tl.float32)  # [BN, BH]
            b_acc += b_corr[:, None] * b_r
            b_k += b_hit.to(tl.int64)
    if TEACHER == 3:
        if i_s == 0:
            # the teacher's part of dh, -wbar (times 1/T below), added once: by the first vocabulary split
            if HAS_WEIGHT:
                b_keep = m_n & (tl.load(tw_ptr + o_n * stride_tw, mask=m_n, other=0.0) != 0)
            else:
                b_keep = m_n
            p_t = t_ptr + o_n[:, None] * stride_tn + o_h[None, :] * stride_tc
            b_acc -= tl.load(p_t, mask=b_keep[:, None] & m_h[None, :], other=0.0).to(tl.float32)  # [BN, BH]
    p_g = g_ptr + i_s * stride_gs + o_n[:, None] * stride_gn + o_h[None, :] * stride_gh
    tl.store(p_g, (b_acc * inv_temp).to(g_ptr.dtype.element_ty), mask=m_n[:, None] & m_h[None, :])
    if FILTER:
        if i_h == 0:  # every H tile of these rows made the same decisions: one of them writes the row's totals
            tl.store(drop_ptr + i_s * stride_ds + o_n, b_drop * inv_temp, mask=m_n)
            tl.store(cnt_ptr + i_s * stride_ds + o_n, b_cnt, mask=m_n)


# ----------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _dot_settings(hidden: torch.Tensor, lm_weight: torch.Tensor) -> tuple[int, str, torch.dtype]:
    """tl.dot operand dtype code, its precision, and the dtype of the [C, V] buffers."""
    if hidden.dtype == lm_weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16):
        return _DOT_CODE[hidden.dtype], "tf32", torch.float16  # fp16 keeps 3 more bits of e in [0, 1]
    tf32 = lm_weight.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return 0, "tf32" if tf32 else "ieee", torch.float32


def chunk_rows(n: int, vocab: int, hidden_size: int, bytes_per_entry: int, *, budget: int | None = None) -> int:
    """Rows per token chunk: the [C, V] buffers stay within ``budget`` bytes.

    The default budget is 28 bytes per hidden-state entry of the batch (clamped to 32 MiB .. 512 MiB).
    Liger's chunk of bf16 logits is about 32 bytes per entry (its chunk rows are N·16H/V rounded up to
    a power of two), so with the gradient, the statistics and the split-V partials on top, the peak extra
    memory stays below Liger's at the four benchmark shapes (estimated 149 / 222 / 474 / 616 MiB against the
    194 / 299 / 510 / 1034 MiB Liger 0.8.5 measured on an H100). ``FASTSOFT_SOFTMAX_KL_CHUNK_ROWS`` overrides the result.
    """
    forced = _env_int("FASTSOFT_SOFTMAX_KL_CHUNK_ROWS")
    if forced:
        return max(1, min(n, forced))
    if budget is None:
        budget = min(512 * 2**20, max(32 * 2**20, 28 * n * hidden_size))
    per_row = vocab * bytes_per_entry + 4 * (vocab // BV_STATS + 1) * 5
    rows = max(1, budget // per_row)
    if rows >= n:
        return n
    return max(64, rows // 64 * 64) if not INTERPRET else rows


def _split_v(rows: int, vocab: int, hidden_size: int, device: torch.device) -> int:
    """Number of vocabulary splits of the gradient GEMM so that small chunks still fill the GPU."""
    forced = _env_int("FASTSOFT_SOFTMAX_KL_SPLIT_V")
    if forced:
        return max(1, min(forced, triton.cdiv(vocab, BV_STATS)))
    programs = triton.cdiv(rows, 128) * triton.cdiv(hidden_size, 128)
    want = triton.cdiv(2 * _sm_count(device), programs)
    return max(1, min(want, triton.cdiv(vocab, 4 * BV_STATS)))


def memory_estimate(
    n: int, vocab: int, hidden_size: int, *, sparse: bool = False, k: int = 64, itemsize: int = 2, sm_count: int = 132
) -> int:
    """Peak extra bytes of one call with a gradient: chunk buffers, statistics, split-V partials, sparse id
    tables, the gradient."""
    nbuf_bytes = (1 if sparse else 2) * (2 if itemsize < 4 else 4)
    rows = chunk_rows(n, vocab, hidden_size, nbuf_bytes)
    nvt = triton.cdiv(vocab, BV_STATS)
    programs = triton.cdiv(rows, 128) * triton.cdiv(hidden_size, 128)
    split = max(1, min(triton.cdiv(2 * sm_count, programs), triton.cdiv(vocab, 4 * BV_STATS)))
    partial = split * rows * hidden_size * 4 if split > 1 else 0
    stats = (4 if sparse else 5) * rows * nvt * 4
    ids = n * k * (4 + 4 + 4 + 4 + 8) if sparse else 0  # sorted ids, weights, z at ids, corrections, sort index
    return rows * triton.cdiv(vocab, 8) * 8 * nbuf_bytes + stats + partial + ids + n * hidden_size * itemsize


def _prepare_teacher(teacher, n: int, device: torch.device):
    """Kernel-side view of a teacher: (kind, tensor for K1, sparse pieces or None)."""
    if isinstance(teacher, SparseTarget):
        ids, order = teacher.ids.sort(dim=1)  # the kernels walk each row's ids in order
        probs = teacher.probs.gather(1, order).float().contiguous()
        k = ids.shape[1]
        sparse = {
            "ids": ids.to(torch.int32).contiguous(),
            "probs": probs,
            "tail": None if teacher.tail is None else teacher.tail.float().contiguous(),
            "zk": torch.full((n, k), float("nan"), dtype=torch.float32, device=device),  # an id never met stays NaN
            "corr": torch.empty((n, k), dtype=torch.float32, device=device),
            "K": k,
        }
        return SPARSE, None, sparse
    if isinstance(teacher, HiddenTarget):
        return HIDDEN, teacher.hidden, None
    if isinstance(teacher, CompactTarget):
        return COMPACT, teacher.wbar, None
    return DENSE, teacher.logprobs, None


def softmax_kl_rows(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher,
    temperature: float,
    token_weight: torch.Tensor | None,
    need_grad: bool,
    divergence: str = "forward",
    beta: float = 0.5,
    grad_filter: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses and input gradients in one launch sequence (the backend contract of ``softmax_kl``).

    Args:
        hidden: ``[N, H]`` bf16/fp16/fp32 student hidden states, any strides.
        lm_weight: ``[V, H]`` frozen lm_head weight, any strides (never differentiated).
        teacher: dense log-probs ``[N, V]`` (re-tempered as ``log_softmax(t / T)``), a :class:`SparseTarget`
            (ids, probs, optional tail), a :class:`HiddenTarget` (``[N, H]``) or a :class:`CompactTarget`
            (``wbar [N, H]``, ``neg_entropy [N]``; the sparse path with no ids plus ``-h . wbar / T``).
        temperature: ``T > 0``; student (and dense/hidden teacher) logits are divided by it.
        token_weight: ``[N]`` or None; rows with weight 0 give loss 0 and gradient 0 and their teacher
            rows are never trusted.
        need_grad: also compute ``d loss_n / d hidden_n``.
        grad_filter: None, or ``(wnorm, scale)`` with ``wnorm [V]`` fp32 ``= ||lm_weight[v]||_2`` and a float
            ``scale >= 0`` (compact teacher, forward divergence, ``need_grad`` only; ValueError otherwise): the
            gradient GEMM skips every ``BN x BV`` tile in which each row has ``sum_v |dz_v| * max_v wnorm_v <=
            scale * BV`` (``dz = p``; the ``-wbar`` part is always added). The loss is unchanged.

    Returns:
        ``loss [N]`` fp32 (unweighted) and ``grad [N, H]`` in ``hidden.dtype`` (or None). With ``grad_filter``,
        also ``dropped [N]`` fp32, per row ``sum`` over the skipped columns of ``|dz_v| wnorm_v / T`` (so
        ``||grad_exact - grad|| <= dropped`` row by row), and ``skipped``, a 0-dim fp32 tensor: the share of the
        ``N x V`` products of the gradient GEMM that were skipped.

    ``divergence="reverse" | "jsd"`` (dense and hidden teachers, ``beta`` the JSD's teacher weight): see
    :func:`_divergence_rows`.

    Memory: one token chunk of ``[C, V]`` buffers (two for dense/hidden teachers, one for sparse and compact;
    fp16 for 16-bit inputs, fp32 otherwise) plus ``[C, V/128]`` fp32 statistics; never ``[N, V]``; no
    ``[V, H]`` gradient. No host synchronisation.
    """
    teacher = as_target(teacher)
    if grad_filter is not None:
        wnorm, filter_scale = _check_grad_filter(grad_filter, teacher, lm_weight, divergence, need_grad)
    if divergence != "forward":
        return _divergence_rows(hidden, lm_weight, teacher, temperature, token_weight, need_grad, divergence, beta)
    n, hsize = hidden.shape
    vocab = lm_weight.shape[0]
    device = hidden.device
    loss = torch.zeros(n, dtype=torch.float32, device=device)
    grad = torch.empty_like(hidden) if need_grad else None
    if n == 0:
        if grad_filter is not None:
            return loss, grad, torch.zeros(0, dtype=torch.float32, device=device), loss.new_zeros(())
        return loss, grad
    if hidden.dtype == torch.float64 or lm_weight.dtype == torch.float64:  # computed in fp32 (documented)
        hidden32 = hidden.float()
        out = softmax_kl_rows(
            hidden32, lm_weight.float(), teacher, temperature, token_weight, need_grad, grad_filter=grad_filter
        )
        return (out[0], None if out[1] is None else out[1].to(hidden.dtype), *out[2:])

    kind, tensor, sparse = _prepare_teacher(teacher, n, device)
    neg_entropy = teacher.neg_entropy if kind == COMPACT else None
    dot, precision, buf_dtype = _dot_settings(hidden, lm_weight)
    nbuf = (2 if kind in (DENSE, HIDDEN) else 1) if need_grad else 0
    rows = chunk_rows(n, vocab, hsize, nbuf * buf_dtype.itemsize)
    nvt = triton.cdiv(vocab, BV_STATS)
    stride_e = triton.cdiv(vocab, 8) * 8  # 16-byte aligned buffer rows
    stats = torch.empty((_SLOTS[kind], rows, nvt), dtype=torch.float32, device=device)
    e_buf = torch.empty((rows, stride_e), dtype=buf_dtype, device=device) if need_grad else stats
    f_buf = (
        torch.empty((rows, stride_e), dtype=buf_dtype, device=device)
        if need_grad and kind in (DENSE, HIDDEN)
        else e_buf
    )
    inv_temp = 1.0 / float(temperature)
    has_weight = token_weight is not None
    tw = token_weight if has_weight else loss
    k = sparse["K"] if sparse else 0
    log2k = max(0, math.ceil(math.log2(k + 1)))
    split = _split_v(rows, vocab, hsize, device) if need_grad else 1
    v_split = triton.cdiv(triton.cdiv(vocab, split), BV_STATS) * BV_STATS
    split = triton.cdiv(vocab, v_split)
    partial = torch.empty((split, rows, hsize), dtype=torch.float32, device=device) if need_grad and split > 1 else None
    if grad_filter is not None:
        # per (vocabulary split, row): the dropped bound and the skipped column count, summed over splits below
        drop_buf = torch.empty((2, split, n), dtype=torch.float32, device=device)
    else:
        wnorm, filter_scale, drop_buf = loss, 0.0, loss.view(1, 1, n).expand(2, 1, n)  # unused pointers

    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        c = r1 - r0
        h = hidden[r0:r1]
        if kind == SPARSE:
            t = loss  # unused pointer
            stride_t = (0, 0)
            ids = sparse["ids"][r0:r1]
            zk = sparse["zk"][r0:r1]
            corr = sparse["corr"][r0:r1]
        else:
            t = tensor[r0:r1]
            stride_t = (t.stride(0), t.stride(1))
            ids = zk = corr = loss
        tw_c = tw[r0:r1]
        stride_tw = tw_c.stride(0) if has_weight else 0
        common = dict(TEACHER=kind, HAS_WEIGHT=has_weight)

        def fwd_grid(meta):
            return (triton.cdiv(c, meta["BN"]) * nvt,)

        _softmax_kl_fwd_kernel[fwd_grid](
            h,
            lm_weight,
            t,
            tw_c,
            ids,
            zk,
            e_buf,
            f_buf,
            stats,
            c,
            vocab,
            hsize,
            k,
            nvt,
            rows * nvt,
            inv_temp,
            h.stride(0),
            h.stride(1),
            lm_weight.stride(0),
            lm_weight.stride(1),
            stride_t[0],
            stride_t[1],
            stride_tw,
            stride_e,
            HAS_TAIL=bool(sparse and sparse["tail"] is not None),
            STORE=need_grad,
            LOG2K=log2k,
            DOT=dot,
            DOT_PRECISION=precision,
            BV=BV_STATS,
            **common,
        )
        tail = sparse["tail"][r0:r1] if sparse and sparse["tail"] is not None else loss
        if kind == COMPACT:
            tail = neg_entropy[r0:r1]  # the row kernel reads sum q log q from the tail slot
        _softmax_kl_row_kernel[(c,)](
            stats,
            loss[r0:r1],
            tw_c,
            ids,
            sparse["probs"][r0:r1] if sparse else loss,
            zk,
            corr,
            tail,
            h,
            t,
            k,
            nvt,
            rows * nvt,
            hsize,
            inv_temp,
            stride_tw,
            h.stride(0),
            h.stride(1),
            stride_t[0],
            stride_t[1],
            HAS_TAIL=bool(sparse and sparse["tail"] is not None),
            NEED_GRAD=need_grad,
            BT=min(1024, triton.next_power_of_2(nvt)),
            BK=max(1, triton.next_power_of_2(k)),
            **common,
        )
        if not need_grad:
            continue
        out = grad[r0:r1] if partial is None else partial[:, :c]
        stride_out = (
            (0, out.stride(0), out.stride(1)) if partial is None else (out.stride(0), out.stride(1), out.stride(2))
        )

        def bwd_grid(meta):
            return (triton.cdiv(c, meta["BN"]) * triton.cdiv(hsize, meta["BH"]), split)

        _softmax_kl_bwd_kernel[bwd_grid](
            e_buf,
            f_buf,
            stats,
            lm_weight,
            out,
            ids,
            corr,
            tw_c,
            t,
            c,
            vocab,
            hsize,
            k,
            nvt,
            rows * nvt,
            v_split,
            inv_temp,
            filter_scale,
            wnorm,
            drop_buf[0, :, r0:r1],
            drop_buf[1, :, r0:r1],
            drop_buf.stride(1),
            stride_e,
            lm_weight.stride(0),
            lm_weight.stride(1),
            *stride_out,
            stride_tw,
            stride_t[0],
            stride_t[1],
            FILTER=grad_filter is not None,
            LOG2K=log2k,
            BV_STATS=BV_STATS,
            DOT=dot,
            DOT_PRECISION=precision,
            **common,
        )
        if partial is not None:
            grad[r0:r1].copy_(partial[:, :c].sum(0))
    if grad_filter is not None:
        dropped = drop_buf[0].sum(0)
        skipped = (drop_buf[1].sum(dtype=torch.float64) / (n * vocab)).float()  # counts add exactly in fp64
        return loss, grad, dropped, skipped
    return loss, grad


def _check_grad_filter(grad_filter, teacher, lm_weight: torch.Tensor, divergence: str, need_grad: bool):
    """Validates ``grad_filter = (wnorm, scale)``; returns ``wnorm`` as a contiguous fp32 ``[V]`` and ``scale``."""
    check_grad_filter(teacher, divergence, need_grad)
    try:
        wnorm, scale = grad_filter
    except (TypeError, ValueError):
        raise ValueError(f"grad_filter must be None or a tuple (wnorm, scale), got {grad_filter!r}") from None
    scale = float(scale)
    if not scale >= 0:
        raise ValueError(f"grad_filter scale must be a float >= 0, got {scale!r}")
    vocab = lm_weight.shape[0]
    if not isinstance(wnorm, torch.Tensor) or tuple(wnorm.shape) != (vocab,) or wnorm.device != lm_weight.device:
        raise ValueError(f"grad_filter wnorm must be a [V] = [{vocab}] tensor on {lm_weight.device}")
    return wnorm.to(torch.float32).contiguous(), scale


def _divergence_rows(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher,
    temperature: float,
    token_weight: torch.Tensor | None,
    need_grad: bool,
    divergence: str,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reverse KL or JSD (kernels/softmax_kl.md §2b), per token chunk: the forward kernel stores the tempered
    student and teacher logits (fp32 ``[C, V]`` each, whatever the input dtype: ``log p`` and ``log q`` are needed
    to full precision, and a teacher exponential that underflows would make a finite reverse KL infinite) and the
    tile statistics; ``lse`` and ``lse_t`` are merged from them; ``_divergence_row_kernel`` forms the loss and
    overwrites the student logits with ``dL/dz``; the backward kernel (kind ``DIVERGENCE``: scale 1, no teacher
    term) multiplies by ``W / T``. Dense and hidden teachers only."""
    check_divergence(teacher, divergence)
    n, hsize = hidden.shape
    vocab = lm_weight.shape[0]
    device = hidden.device
    loss = torch.zeros(n, dtype=torch.float32, device=device)
    grad = torch.empty_like(hidden) if need_grad else None
    if n == 0:
        return loss, grad
    if hidden.dtype == torch.float64 or lm_weight.dtype == torch.float64:  # computed in fp32 (documented)
        loss32, grad32 = _divergence_rows(
            hidden.float(), lm_weight.float(), teacher, temperature, token_weight, need_grad, divergence, beta
        )
        return loss32, None if grad32 is None else grad32.to(hidden.dtype)
    kind, tensor, _ = _prepare_teacher(teacher, n, device)
    dot, precision, _ = _dot_settings(hidden, lm_weight)
    rows = chunk_rows(n, vocab, hsize, 2 * 4)
    nvt = triton.cdiv(vocab, BV_STATS)
    stride_e = triton.cdiv(vocab, 8) * 8
    stats = torch.empty((_SLOTS[kind], rows, nvt), dtype=torch.float32, device=device)
    z_buf = torch.empty((rows, stride_e), dtype=torch.float32, device=device)
    a_buf = torch.empty((rows, stride_e), dtype=torch.float32, device=device)
    inv_temp = 1.0 / float(temperature)
    has_weight = token_weight is not None
    tw = token_weight if has_weight else loss
    split = _split_v(rows, vocab, hsize, device) if need_grad else 1
    v_split = triton.cdiv(triton.cdiv(vocab, split), BV_STATS) * BV_STATS
    split = triton.cdiv(vocab, v_split)
    partial = torch.empty((split, rows, hsize), dtype=torch.float32, device=device) if need_grad and split > 1 else None
    jsd = divergence == "jsd"
    log_beta, log_1mb = (math.log(beta), math.log1p(-beta)) if jsd else (0.0, 0.0)

    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        c = r1 - r0
        h = hidden[r0:r1]
        t = tensor[r0:r1]
        tw_c = tw[r0:r1]
        stride_tw = tw_c.stride(0) if has_weight else 0

        def fwd_grid(meta):
            return (triton.cdiv(c, meta["BN"]) * nvt,)

        _softmax_kl_fwd_kernel[fwd_grid](
            h, lm_weight, t, tw_c, loss, loss, z_buf, a_buf, stats,
            c, vocab, hsize, 0, nvt, rows * nvt, inv_temp,
            h.stride(0), h.stride(1), lm_weight.stride(0), lm_weight.stride(1), t.stride(0), t.stride(1),
            stride_tw, stride_e,
            TEACHER=kind, HAS_TAIL=False, HAS_WEIGHT=has_weight, STORE=True, LOG2K=0, DOT=dot,
            DOT_PRECISION=precision, BV=BV_STATS, LOGITS=True,
        )  # fmt: skip
        # lse and lse_t from the tile statistics, kept split as (max M, log sum S): log p = (z - M) - log S rounds like
        # log_softmax (M + log S in fp32 would round at the scale of |z|); [c, 4], no host synchronisation
        st = stats[:, :c]
        m_z, m_a = st[0].amax(1), st[2].amax(1)
        m_a_safe = torch.where(m_a == float("-inf"), torch.zeros_like(m_a), m_a)
        s_z = (st[1] * (st[0] - m_z[:, None]).exp()).sum(1)
        s_a = (st[3] * (st[2] - m_a_safe[:, None]).exp()).sum(1)
        lse = torch.stack([m_z, s_z.log(), m_a, s_a.log()], 1).contiguous()
        _divergence_row_kernel[(c,)](
            z_buf, a_buf, lse, loss[r0:r1], tw_c, vocab, stride_e, stride_tw,
            float(beta), log_beta, log_1mb,
            JSD=jsd, HAS_WEIGHT=has_weight, NEED_GRAD=need_grad, BT=64 if INTERPRET else 1024,
        )  # fmt: skip
        if not need_grad:
            continue
        stats[0, :c].fill_(1.0)  # the backward kernel's per-tile scale: the buffer already holds dL/dz
        out = grad[r0:r1] if partial is None else partial[:, :c]
        stride_out = (
            (0, out.stride(0), out.stride(1)) if partial is None else (out.stride(0), out.stride(1), out.stride(2))
        )

        def bwd_grid(meta):
            return (triton.cdiv(c, meta["BN"]) * triton.cdiv(hsize, meta["BH"]), split)

        _softmax_kl_bwd_kernel[bwd_grid](
            z_buf, a_buf, stats, lm_weight, out, loss, loss, tw_c, t,
            c, vocab, hsize, 0, nvt, rows * nvt, v_split, inv_temp, 0.0, loss, loss, loss, 0,
            stride_e, lm_weight.stride(0), lm_weight.stride(1), *stride_out, stride_tw, t.stride(0), t.stride(1),
            TEACHER=DIVERGENCE, HAS_WEIGHT=has_weight, FILTER=False, LOG2K=0, BV_STATS=BV_STATS, DOT=dot,
            DOT_PRECISION=precision,
        )  # fmt: skip
        if partial is not None:
            grad[r0:r1].copy_(partial[:, :c].sum(0))
    return loss, grad
