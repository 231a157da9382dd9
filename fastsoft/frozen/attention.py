"""Attention implementations fastsoft runs the frozen model with, and the one switch that selects them.

Three packed layouts, all exact (no segment ever sees another's tokens):

- ``fastsoft_varlen``: torch's varlen flash kernel (``torch.nn.attention.varlen``) on CUDA in fp16/bf16,
  segments given by ``cu_seq_lens_*`` — as flash-attn's own ``flash_attention_2`` is when installed;
- ``fastsoft_buckets``: the segments right-padded into a batch and run as masked sdpa calls: all in one call, or one
  per *length bucket* (segments within a factor 2 of each other's length) when that computes fewer padded entries
  (:func:`length_buckets`) — ``O(sum segment^2)`` work where a block-diagonal mask over the whole row would cost
  ``O(row^2)``. The student's path on CPU and for fp32 on GPU;
- ``fastsoft_teacher`` (``fastsoft/teacher/batching.py``): prefix ⊕ own row merged through their log-sum-exp,
  with :func:`attention_lse` (fused kernels that return the log-sum-exp) and the same length buckets.

The two packed student layouts also take shared prefixes: the frozen template head (``fastsoft_prefix=``,
:mod:`fastsoft.frozen.prefix`), whose cached keys and values every run attends to first, and a *lead* run per job (its soft
prompt σ, computed once per step with its gradient) that each of the job's segments attends to next, before its own
tokens (``Packed.leads``, :mod:`fastsoft.frozen.packing`).

Nothing is registered with transformers at import: :func:`attention_implementation` registers the
implementation it switches to, the first time it is asked for.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

VARLEN_ATTENTION = "fastsoft_varlen"
VARLEN_ATTENTIONS = ("flash_attention_2", "flash_attention_3", VARLEN_ATTENTION)
BUCKETS_ATTENTION = "fastsoft_buckets"
PREFIX_ATTENTIONS = (VARLEN_ATTENTION, BUCKETS_ATTENTION)  # the packed layouts that take a shared prefix


@contextlib.contextmanager
def attention_implementation(loaded, name: str, function: Callable | None = None):
    """Run the model with attention implementation ``name`` inside the block.

    ``name`` is one of transformers' own implementations, one of this module's, or a new one given as
    ``function`` (transformers' attention signature); fastsoft's are registered here on first use.
    """
    register(name, function)
    config = loaded.model.config
    previous = config._attn_implementation
    if name == previous:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


_REGISTERED: dict[str, Callable] = {}


def register(name: str, function: Callable | None = None) -> None:
    """Register a fastsoft attention implementation with transformers (once; other names pass through)."""
    function = function or {VARLEN_ATTENTION: _varlen_attention, BUCKETS_ATTENTION: _bucket_attention}.get(name)
    if function is None or _REGISTERED.get(name) is function:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    _REGISTERED[name] = function


def group_by_length(pieces: list[tuple]) -> list[list[tuple]]:
    """``(offset, length, ...)`` runs of a row grouped into length buckets (lengths within a factor of 2), in order."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for piece in pieces:
        groups.setdefault(piece[1].bit_length(), []).append(piece)
    return list(groups.values())


def bucket_index(pieces: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors that right-pad one bucket of runs into a batch ``[B, W]``: ``gather [B, W]`` (row positions;
    padding repeats a run's first token, never seen by a real query under causal attention), ``real [n]`` (row
    positions of the real tokens) and ``where [n]`` (their places in the flattened ``[B * W]`` batch)."""
    width = max(n for _, n in pieces)
    gather = [list(range(o, o + n)) + [o] * (width - n) for o, n in pieces]
    real = [o + i for o, n in pieces for i in range(n)]
    where = [b * width + i for b, (_, n) in enumerate(pieces) for i in range(n)]
    return tuple(torch.tensor(x, dtype=torch.int64).to(device) for x in (gather, real, where))


@dataclass(frozen=True)
class Bucket:
    """One sdpa call of :func:`_bucket_attention`: ``B`` runs of the packed row, right-padded to ``W`` queries.

    ``queries [B, W]``: row positions of each run's tokens (padding repeats its first token; a padded query's output is
    dropped). ``keys [B, K]``: positions in the key rows ``cat(prefix [Lp], row [L])`` that each run sees, in order:
    the whole shared prefix, ``C`` slots for its lead run (its job's σ; a shorter or no lead leaves slots masked), then
    its own tokens padded like the queries (a real query never sees the padding: it is causal). ``mask [B, 1, W, K]``:
    query ``i`` of a run sees the prefix, its lead and its own keys up to ``i`` (None: nothing in front, plain
    causal). ``where [n]``: places of the real tokens in the flattened ``[B * W]`` output, in the order of its runs."""

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor | None
    where: torch.Tensor


@dataclass(frozen=True)
class Buckets:
    """A packed row's runs as :class:`Bucket` calls, and ``order [L]``: the row position of each output row once the
    buckets' real outputs are concatenated is undone by ``index_select(0, order)``."""

    buckets: tuple[Bucket, ...]
    order: torch.Tensor


# One more sdpa call (forward and backward) costs about as much on CPU as this many more score entries per head
# (measured on the 2-core machine, SmolLM2's 9 heads of 64, a 160-token row: ~0.5 ms a call).
CALL_COST_ENTRIES = 4096


def _bucket(runs: list[tuple[int, int, int, int]], prefix_length: int, device) -> tuple[Bucket, torch.Tensor]:
    """One :class:`Bucket` on ``device`` of ``runs`` ``(start, length, lead start, lead length)``, and the row
    positions of its real tokens (on the host)."""
    queries, real, where = bucket_index([(start, n) for start, n, _, _ in runs], "cpu")
    width, slots = queries.shape[1], max(lead for *_, lead in runs)
    front = prefix_length + slots
    keys, masks = [], []
    for (_, _, lead_start, lead), row in zip(runs, queries.tolist()):
        lead_keys = [prefix_length + lead_start + i if i < lead else 0 for i in range(slots)]
        keys.append(list(range(prefix_length)) + lead_keys + [prefix_length + p for p in row])
        mask = torch.ones(width, front + width, dtype=torch.bool).tril(front)
        mask[:, prefix_length + lead : front] = False  # the lead slots it does not have
        masks.append(mask)
    mask = torch.stack(masks)[:, None].to(device) if front else None
    keys = torch.tensor(keys, dtype=torch.int64)
    return Bucket(queries.to(device), keys.to(device), mask, where.to(device)), real


def _padded_entries(groups: list[list[tuple[int, int, int, int]]], prefix_length: int) -> int:
    """Score entries per head the groups' sdpa calls compute, plus :data:`CALL_COST_ENTRIES` a call."""
    total = 0
    for runs in groups:
        width, slots = max(n for _, n, _, _ in runs), max(lead for *_, lead in runs)
        total += CALL_COST_ENTRIES + len(runs) * width * (prefix_length + slots + width)
    return total


def length_buckets(
    cu_seq_lens: torch.Tensor, device, leads: torch.Tensor | None = None, prefix_length: int = 0
) -> Buckets:
    """The packed row's runs (``cu_seq_lens [R + 1]``, on the host; ``leads [R, 2]``: ``(start, length)`` of the
    lead run each sees before its own tokens, length 0 for none; ``prefix_length``: the shared prefix every run sees
    first) as :class:`Bucket` calls: all runs in one call, or one call per length bucket (lengths within a factor of
    2), whichever computes fewer padded score entries counting each call as :data:`CALL_COST_ENTRIES` more (a small
    step's few runs: one call; many runs of very different lengths: buckets). Index tensors are built on the host
    once a step and reused by every layer."""
    bounds = cu_seq_lens.tolist()
    lead_of = leads.tolist() if leads is not None else [(0, 0)] * (len(bounds) - 1)
    runs = [(a, b - a, lead, n) for (a, b), (lead, n) in zip(zip(bounds[:-1], bounds[1:]), lead_of)]
    groups = min([runs], group_by_length(runs), key=lambda g: _padded_entries(g, prefix_length))
    buckets, placed = [], []
    for group in groups:
        bucket, real = _bucket(group, prefix_length, device)
        buckets.append(bucket)
        placed.append(real)
    order = torch.empty(int(bounds[-1]), dtype=torch.int64)
    order[torch.cat(placed)] = torch.arange(int(bounds[-1]))
    return Buckets(tuple(buckets), order.to(device))


# -- the student's packed attention ---------------------------------------------------------------


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def packed_attention(loaded) -> str:
    """The attention implementation a packed step runs with (see the module docstring)."""
    current = loaded.model.config._attn_implementation
    if current in VARLEN_ATTENTIONS:
        return current
    if loaded.device.type == "cuda" and loaded.dtype in (torch.float16, torch.bfloat16) and _torch_varlen() is not None:
        return VARLEN_ATTENTION
    if current == "sdpa":
        return BUCKETS_ATTENTION
    return current


def _bucket_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    fastsoft_buckets=None,
    fastsoft_prefix=None,
    **kwargs,
):
    """Packed causal attention as one masked sdpa call per :class:`Bucket` of ``fastsoft_buckets``
    (:func:`length_buckets`: all runs in one call, or one per length bucket). ``query [1, H, L, D]``,
    ``key/value [1, KV, L, D]``; returns ``[1, L, H, D]``. ``fastsoft_prefix`` (a :class:`fastsoft.frozen.prefix.SharedPrefix`):
    every run first sees all its ``Lp`` cached positions; then its lead, then its own tokens causally.

    Every gather reads whole ``[H, D]`` rows of the ``[L, H, D]`` layout the projections wrote (no transposed copies),
    and the output is put back in row order by one ``index_select``: per layer, the prefix joined to the key rows
    (two ``cat``), four gathers and one sdpa call a bucket, one final gather, and their backward scatters."""
    if fastsoft_buckets is None:
        raise RuntimeError("fastsoft_buckets attention needs the packed row's length buckets (a packed student step)")
    if kwargs.get("sliding_window") is not None:
        raise RuntimeError("fastsoft_buckets attention does not support sliding-window layers")
    heads, dim = query.shape[1], query.shape[-1]
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [L, H|KV, D]
    if fastsoft_prefix is not None:  # key rows: the cached head's [Lp, KV, D], then the row's
        layer = module.layer_idx
        k = torch.cat([fastsoft_prefix.keys[layer].transpose(0, 1).to(k.dtype), k])
        v = torch.cat([fastsoft_prefix.values[layer].transpose(0, 1).to(v.dtype), v])
    outs = []
    for bucket in fastsoft_buckets.buckets:
        take = lambda x, rows: x.index_select(0, rows.flatten()).unflatten(0, rows.shape).transpose(1, 2)
        qb, kb, vb = take(q, bucket.queries), take(k, bucket.keys), take(v, bucket.keys)  # [B, H|KV, W|K, D]
        mask = dict(is_causal=True) if bucket.mask is None else dict(attn_mask=bucket.mask)
        o = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, scale=scaling, enable_gqa=kb.shape[1] != heads, **mask
        )
        outs.append(o.transpose(1, 2).reshape(-1, heads, dim).index_select(0, bucket.where))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, fastsoft_buckets.order)[None], None


def varlen_keys(cu_seq_lens: torch.Tensor, prefix_length: int, device, leads: torch.Tensor | None = None) -> dict:
    """The key side of a varlen call where each of the packed row's runs (``cu_seq_lens [R + 1]``, host) sees first a
    shared prefix of ``prefix_length`` cached positions, then its lead run (``leads [R, 2]``: ``(start, length)`` in
    the row, length 0 for none), then its own tokens: ``cu_seq_lens_k``, ``max_length_k`` and ``fastsoft_key_index``
    (rows of ``cat(prefix, row)``, one run's keys after another's)."""
    bounds = cu_seq_lens.tolist()
    lead_of = leads.tolist() if leads is not None else [(0, 0)] * (len(bounds) - 1)
    index, key_bounds = [], [0]
    for (start, end), (lead, lead_length) in zip(zip(bounds[:-1], bounds[1:]), lead_of):
        index += list(range(prefix_length))
        index += range(prefix_length + lead, prefix_length + lead + lead_length)
        index += range(prefix_length + start, prefix_length + end)
        key_bounds.append(len(index))
    return dict(
        cu_seq_lens_k=torch.tensor(key_bounds, dtype=torch.int32, device=device),
        max_length_k=max(b - a for a, b in zip(key_bounds[:-1], key_bounds[1:])),
        fastsoft_key_index=torch.tensor(index, dtype=torch.int64, device=device),
    )


def _gather_keys(own, prefix, which: str, layer: int, index):
    """Rows ``index`` of ``cat(prefix's cached [Lp, KV, D], own [L, KV, D])`` (no prefix: of ``own``)."""
    rows = [own] if prefix is None else [getattr(prefix, which)[layer].transpose(0, 1).to(own.dtype), own]
    return torch.cat(rows).index_select(0, index)


def _varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    fastsoft_prefix=None,
    fastsoft_key_index=None,
    **kwargs,
):
    """Packed causal attention with torch's varlen flash kernel. ``query [1, H, L, D]``, ``key/value
    [1, KV, L, D]`` (one packed row), segments given by ``cu_seq_lens_*``; returns ``[1, L, H, D]``.
    ``fastsoft_key_index`` (:func:`varlen_keys`): each run's keys are the prefix's (``fastsoft_prefix``), its lead's,
    then its own; the kernel's causal mask is aligned to the bottom right, so query ``i`` sees all the keys before its
    own and its own up to ``i``."""
    if cu_seq_lens_q is None:
        raise RuntimeError("fastsoft_varlen attention needs cu_seq_lens_q/k and max_length_q/k (a packed student step)")
    if kwargs.get("sliding_window") is not None:
        raise RuntimeError("fastsoft_varlen attention does not support sliding-window layers")
    varlen_attn = _torch_varlen()
    params = inspect.signature(varlen_attn).parameters
    heads, dim = query.shape[1], query.shape[-1]
    q = query[0].transpose(0, 1)  # [L, H, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [L, KV, D]
    if fastsoft_key_index is not None:  # each run's keys: a copy of the prefix's, of its lead's, then its own
        k = _gather_keys(k, fastsoft_prefix, "keys", module.layer_idx, fastsoft_key_index)
        v = _gather_keys(v, fastsoft_prefix, "values", module.layer_idx, fastsoft_key_index)
    extra = {}
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1)
    if "is_causal" in params:  # torch 2.10
        extra["is_causal"] = True
    else:  # torch >= 2.11: causal is a (left, right) = (-1, 0) window
        extra["window_size"] = (-1, 0)
    if scaling is not None and not math.isclose(scaling, dim**-0.5):
        if "scale" in params:
            extra["scale"] = scaling
        else:
            q = q * (scaling * dim**0.5)
    out = varlen_attn(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        **extra,
    )
    return out[None], None


# -- attention with its log-sum-exp (the teacher's merge) ---------------------------------------


LSE_FAILED: set = set()


def attention_lse(q, k, v, scale: float, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, H, Q, D]`` and its fp32 log-sum-exp ``[B, H, Q]`` (causal: top-left aligned).

    Uses the fused kernels that return the log-sum-exp (flash / memory-efficient on CUDA, flash on CPU);
    falls back, with one warning, to a chunked fp32 reference.
    """
    kind = (q.device.type, q.dtype)
    if kind not in LSE_FAILED:
        try:
            if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
                o, s = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
            elif q.device.type == "cuda":
                o, s = torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, None, True, 0.0, causal, scale=scale
                )[:2]
            elif q.device.type == "cpu":
                o, s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
            else:
                raise RuntimeError(f"no fused attention with log-sum-exp on {q.device.type}")
            return o, s[..., : q.shape[2]].float()
        except (RuntimeError, NotImplementedError) as error:
            LSE_FAILED.add(kind)
            warnings.warn(
                f"fastsoft: the teacher's fused attention is not available for {kind} ({str(error).splitlines()[0]}); "
                "using the slower fp32 reference",
                stacklevel=2,
            )
    return attention_lse_reference(q, k, v, scale, causal)


def attention_lse_reference(q, k, v, scale: float, causal: bool = False, chunk_bytes: int = 1 << 28):
    batch, heads, length, dim = q.shape
    keys = k.shape[2]
    step = max(1, chunk_bytes // max(1, 4 * batch * heads * keys))
    outs, lses = [], []
    for lo in range(0, length, step):
        scores = (q[:, :, lo : lo + step].float() @ k.float().transpose(-1, -2)) * scale  # [B, H, c, K]
        if causal:
            rows = torch.arange(lo, min(length, lo + step), device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(keys, device=q.device)[None, :] > rows, -math.inf)
        lses.append(torch.logsumexp(scores, -1))
        outs.append((torch.softmax(scores, -1) @ v.float()).to(q.dtype))
    return torch.cat(outs, 2), torch.cat(lses, 2)
