"""The student step: segments of many jobs packed into one row, each with its own soft prompt written in.

One segment is ``before + σ(slot) + after + answer``. Segments are concatenated with no padding;
``position_ids`` restart at 0 per segment and ``use_cache=False`` makes transformers derive the
packed-sequence mask from them (with its default cache, sdpa/eager/flex silently let segments attend
to each other). Only the final hidden states at scored positions leave this module: the loss needs
nothing else, and logits are never formed here.

Attention, chosen per call by :func:`packed_attention`: flash-attn varlen when the model was loaded with
``attn_implementation="flash_attention_2"`` (``cu_seq_lens_*`` passed, no mask built); on CUDA otherwise
torch's own varlen flash kernel (``torch.nn.attention.varlen``, registered as ``fastsoft_varlen``) for
fp16/bf16; else, for an sdpa model (CPU, fp32 on GPU), sdpa over *length buckets* (``fastsoft_buckets``):
the row's segments are regrouped into right-padded batches of segments within a factor 2 of each other's
length, each one causal sdpa call — a dense block-diagonal mask over the whole row would cost
``O(row²)`` instead of ``O(Σ segment²)``. Eager/flex models keep their own implementation and the mask
transformers derives from the restarting ``position_ids``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch


@dataclass
class Segment:
    """One sequence in a packed step. ``slot=None`` means no soft prompt at all (the no-context baseline)."""

    slot: int | None
    before: list[int]
    after: list[int]
    answer: list[int]  # scored: the hidden state before each answer token predicts it

    def length(self, prompt_length: int) -> int:
        return len(self.before) + (prompt_length if self.slot is not None else 0) + len(self.after) + len(self.answer)


@dataclass
class Packed:
    """A packed row: token ids with σ placeholders, where σ rows come from, positions and scored rows."""

    ids: torch.Tensor  # [L] int64, 0 at σ positions
    sigma_rows: torch.Tensor  # [L] int64 index into the flattened bank [S * P], -1 where a real token
    position_ids: torch.Tensor  # [L] restarting at 0 per segment
    scored: torch.Tensor  # [N] positions whose hidden state is scored
    segment_of_row: torch.Tensor  # [N] segment index of each scored row
    cu_seq_lens: torch.Tensor  # [B + 1] int32 segment boundaries (for varlen attention kernels)


def pack(segments: list[Segment], prompt_length: int) -> Packed:
    ids, sigma_rows, positions, scored, owner, bounds = [], [], [], [], [], [0]
    for index, seg in enumerate(segments):
        start = len(ids)
        sigma = prompt_length if seg.slot is not None else 0
        ids += seg.before + [0] * sigma + seg.after + seg.answer
        sigma_rows += [-1] * len(seg.before) + [seg.slot * prompt_length + j for j in range(sigma)] + [-1] * (len(seg.after) + len(seg.answer))
        positions += range(len(ids) - start)
        first = start + len(seg.before) + sigma + len(seg.after) - 1
        scored += range(first, first + len(seg.answer))
        owner += [index] * len(seg.answer)
        bounds.append(len(ids))
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)
    return Packed(as_long(ids), as_long(sigma_rows), as_long(positions), as_long(scored), as_long(owner),
                  torch.tensor(bounds, dtype=torch.int32))


def scored_hidden(loaded, prompts: torch.Tensor, packed: Packed, attention: str | None = None) -> torch.Tensor:
    """Final hidden states ``[N, H]`` at the scored positions of a packed row.

    ``prompts [S, P, H]`` (fp32, may require grad) supplies σ; gradients reach only the slots used.
    ``attention`` overrides :func:`packed_attention`'s choice (an attention implementation name).
    """
    device = loaded.device
    ids, sigma_rows = packed.ids.to(device), packed.sigma_rows.to(device)
    embeds = loaded.embed(ids)  # [L, H], frozen
    is_sigma = sigma_rows >= 0
    if bool((packed.sigma_rows >= 0).any()):  # on the host: no device sync
        flat = prompts.reshape(-1, prompts.shape[-1]).to(device=device, dtype=embeds.dtype)  # [S * P, H]
        embeds = torch.where(is_sigma[:, None], flat.index_select(0, sigma_rows.clamp_min(0)), embeds)
    attention = attention or packed_attention(loaded)
    extra = {}
    if attention in VARLEN_ATTENTIONS:
        cu = packed.cu_seq_lens.to(device)
        longest = int((packed.cu_seq_lens[1:] - packed.cu_seq_lens[:-1]).max())  # host tensor: no device sync
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    elif attention == BUCKETS_ATTENTION:
        extra = dict(fastsoft_buckets=length_buckets(packed.cu_seq_lens, device))
    with attention_implementation(loaded, attention):
        hidden = loaded.hidden_states(inputs_embeds=embeds[None], position_ids=packed.position_ids.to(device)[None], **extra)[0]
    return hidden.index_select(0, packed.scored.to(device))


# -- attention backends ---------------------------------------------------------------------------

VARLEN_ATTENTION = "fastsoft_varlen"
VARLEN_ATTENTIONS = ("flash_attention_2", "flash_attention_3", VARLEN_ATTENTION)
BUCKETS_ATTENTION = "fastsoft_buckets"


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


def length_buckets(cu_seq_lens: torch.Tensor, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Segments grouped by length (within a factor 2) into right-padded batches: per bucket, ``gather [B, W]``
    (row positions, padding repeats a segment's first token), ``real [n]`` (row positions of the real
    tokens) and ``where [n]`` (their places in the flattened ``[B * W]`` batch)."""
    bounds = cu_seq_lens.tolist()
    groups: dict[int, list[tuple[int, int]]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        groups.setdefault((end - start).bit_length(), []).append((start, end - start))
    buckets = []
    for pieces in groups.values():
        width = max(n for _, n in pieces)
        gather = [list(range(o, o + n)) + [o] * (width - n) for o, n in pieces]
        real = [o + i for o, n in pieces for i in range(n)]
        where = [b * width + i for b, (_, n) in enumerate(pieces) for i in range(n)]
        buckets.append(tuple(torch.tensor(x, dtype=torch.int64).to(device) for x in (gather, real, where)))
    return buckets


def _bucket_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, fastsoft_buckets=None, **kwargs):
    """Packed causal attention as one sdpa call per length bucket. ``query [1, H, L, D]``, ``key/value
    [1, KV, L, D]``; returns ``[1, L, H, D]``. Right padding is never seen by a real query (causal)."""
    if fastsoft_buckets is None:
        raise RuntimeError("fastsoft_buckets attention needs the packed row's length buckets (a packed student step)")
    if kwargs.get("sliding_window") is not None:
        raise RuntimeError("fastsoft_buckets attention does not support sliding-window layers")
    q, k, v = query[0], key[0], value[0]  # [H, L, D], [KV, L, D]
    heads, dim = q.shape[0], q.shape[-1]
    out = q.new_zeros(heads, q.shape[1], dim)
    for gather, real, where in fastsoft_buckets:
        take = lambda x: x.index_select(1, gather.flatten()).unflatten(1, gather.shape).transpose(0, 1)  # [B, H|KV, W, D]
        o = torch.nn.functional.scaled_dot_product_attention(take(q), take(k), take(v), is_causal=True, scale=scaling,
                                                             enable_gqa=k.shape[0] != heads)
        out = out.index_copy(1, real, o.transpose(0, 1).reshape(heads, -1, dim).index_select(1, where))
    return out.transpose(0, 1)[None], None


@contextlib.contextmanager
def attention_implementation(loaded, name: str):
    """Run the model with another registered attention implementation inside the block."""
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


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None, cu_seq_lens_k=None,
                      max_length_q=None, max_length_k=None, **kwargs):
    """Packed causal attention with torch's varlen flash kernel. ``query [1, H, L, D]``, ``key/value
    [1, KV, L, D]`` (one packed row), segments given by ``cu_seq_lens_*``; returns ``[1, L, H, D]``."""
    if cu_seq_lens_q is None:
        raise RuntimeError("fastsoft_varlen attention needs cu_seq_lens_q/k and max_length_q/k (a packed student step)")
    if kwargs.get("sliding_window") is not None:
        raise RuntimeError("fastsoft_varlen attention does not support sliding-window layers")
    varlen_attn = _torch_varlen()
    params = inspect.signature(varlen_attn).parameters
    heads, dim = query.shape[1], query.shape[-1]
    q = query[0].transpose(0, 1)  # [L, H, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [L, KV, D]
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
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **extra)
    return out[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    AttentionInterface.register(BUCKETS_ATTENTION, _bucket_attention)


_register()
