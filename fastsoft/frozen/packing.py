"""The student step: segments of many jobs packed into one row, each with its own soft prompt written in.

One segment is ``before + σ(slot) + after + answer`` (the last answer token left out: its hidden state predicts
nothing scored). Segments are concatenated with no padding;
``position_ids`` restart at 0 per segment and ``use_cache=False`` makes transformers derive the
packed-sequence mask from them (with its default cache, sdpa/eager/flex silently let segments attend
to each other). Only the final hidden states at scored positions leave this module: the loss needs
nothing else, and logits are never formed here.

Attention, chosen per call by :func:`fastsoft.frozen.attention.packed_attention`: flash-attn varlen when the model
was loaded with ``attn_implementation="flash_attention_2"`` (``cu_seq_lens_*`` passed, no mask built); on CUDA
otherwise torch's own varlen flash kernel for fp16/bf16; else, for an sdpa model (CPU, fp32 on GPU), one causal
sdpa call per length bucket. Eager/flex models keep their own implementation and the mask transformers
derives from the restarting ``position_ids``.

Shared frozen prefix (:mod:`fastsoft.frozen.prefix`): when every segment's ``before`` is the same template head and the
attention is one of fastsoft's packed layouts, the head is left out of the row; its keys and values are computed once
per model and every segment attends to them first (positions continue after it). :func:`sharable_prefix` decides.

Shared soft prompt (``share_sigma``, the same layouts): the segments of one job all start ``head + σ``, and σ attends
only to the head and to itself, so its hidden states are the same in every one of them. The row then holds each such
job's σ once, as a *lead* run, and each of its segments as a run of ``after + answer`` alone that attends to the lead
before its own tokens (``Packed.leads``); σ's gradient from all of them meets in the one lead. With 4 queries a job
and P = 16 this leaves out 48 σ rows a step. Exact up to rounding, like the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastsoft.frozen.attention import (
    BUCKETS_ATTENTION,
    PREFIX_ATTENTIONS,
    VARLEN_ATTENTIONS,
    attention_implementation,
    length_buckets,
    packed_attention,
    varlen_keys,
)
from fastsoft.frozen.layers import fused_layers
from fastsoft.frozen.prefix import shared_prefix


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
    """A packed row: token ids with σ placeholders, where σ rows come from, positions and scored rows. With a shared
    ``prefix`` the row leaves out those leading tokens of every segment and its positions start after them."""

    ids: torch.Tensor  # [L] int64, 0 at σ positions
    sigma_rows: torch.Tensor  # [L] int64 index into the flattened bank [S * P], -1 where a real token
    position_ids: torch.Tensor  # [L] per run: from len(prefix), or after its lead for a led segment
    scored: torch.Tensor  # [N] positions whose hidden state is scored
    segment_of_row: torch.Tensor  # [N] segment index of each scored row
    cu_seq_lens: torch.Tensor  # [R + 1] int32 run boundaries (for varlen attention kernels): segments, leads, tails
    prefix: tuple[int, ...] = ()  # the shared frozen prefix every run attends to first (left out of the row)
    leads: torch.Tensor | None = None  # [R, 2] int64 (start, length) of the lead run each run sees next; 0: none


def sharable_prefix(loaded, segments: list[Segment], attention: str | None = None) -> tuple[int, ...]:
    """The tokens every segment starts with (its whole ``before``, when they all have the same one) if the attention
    implementation takes a shared prefix; else ``()``."""
    first = segments[0].before if segments else []
    if not first or any(seg.before != first for seg in segments[1:]):
        return ()
    return tuple(first) if (attention or packed_attention(loaded)) in PREFIX_ATTENTIONS else ()


def sigma_leads(segments: list[Segment], prefix_length: int = 0) -> set[int]:
    """The slots whose segments can share one lead run: two or more segments, all with the same ``before`` after the
    shared prefix, and something after σ in each (every scored row then lies in a segment's own run)."""
    by_slot: dict[int, list[Segment]] = {}
    for seg in segments:
        if seg.slot is not None:
            by_slot.setdefault(seg.slot, []).append(seg)
    return {
        slot
        for slot, segs in by_slot.items()
        if len(segs) > 1 and all(s.after and s.before[prefix_length:] == segs[0].before[prefix_length:] for s in segs)
    }


def pack(
    segments: list[Segment], prompt_length: int, prefix: tuple[int, ...] = (), share_sigma: bool = False
) -> Packed:
    """Concatenate ``segments`` into one row (each without its last answer token, which predicts nothing scored).
    With ``prefix`` (each segment's ``before`` starts with it) those tokens are left out and positions start at
    ``len(prefix)``. With ``share_sigma`` the ``before + σ`` of the slots
    :func:`sigma_leads` names is written once, as a lead run ahead of the slot's first segment, and their segments hold
    only ``after + answer`` (positions continue after the lead). Scored rows stay in segment order either way."""
    shared = len(prefix)
    ids, sigma_rows, positions, scored, owner, bounds, leads = [], [], [], [], [], [0], []
    lead_slots, lead_of_slot = sigma_leads(segments, shared) if share_sigma else set(), {}

    def run(tokens: list[int], slot: int | None, sigma_at: int, sigma: int, first_position: int, lead=(0, 0)) -> int:
        """Append one run (``tokens`` with ``sigma`` σ rows of ``slot`` from ``sigma_at``); returns its start."""
        start = len(ids)
        ids.extend(tokens)
        sigma_rows.extend(
            slot * prompt_length + (i - sigma_at) if sigma_at <= i < sigma_at + sigma else -1
            for i in range(len(tokens))
        )
        positions.extend(range(first_position, first_position + len(tokens)))
        bounds.append(len(ids))
        leads.append(lead)
        return start

    for index, seg in enumerate(segments):
        if shared and tuple(seg.before[:shared]) != tuple(prefix):
            raise ValueError(f"segment {index} does not start with the shared prefix")
        before = seg.before[shared:]
        sigma = prompt_length if seg.slot is not None else 0
        lead_tokens = before + [0] * sigma
        tail = seg.after + seg.answer[:-1]  # the last answer token predicts nothing scored: it is never input
        if seg.slot in lead_slots:
            if seg.slot not in lead_of_slot:
                lead_of_slot[seg.slot] = (run(lead_tokens, seg.slot, len(before), sigma, shared), len(lead_tokens))
            start = run(tail, None, 0, 0, shared + len(lead_tokens), lead_of_slot[seg.slot])
            first = start + len(seg.after) - 1
        else:
            start = run(lead_tokens + tail, seg.slot, len(before), sigma, shared)
            first = start + len(lead_tokens) + len(seg.after) - 1
        scored += range(first, first + len(seg.answer))
        owner += [index] * len(seg.answer)
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)
    return Packed(
        as_long(ids),
        as_long(sigma_rows),
        as_long(positions),
        as_long(scored),
        as_long(owner),
        torch.tensor(bounds, dtype=torch.int32),
        tuple(prefix),
        as_long(leads).reshape(-1, 2) if lead_of_slot else None,
    )


def pack_shared(
    loaded, segments: list[Segment], prompt_length: int, attention: str | None = None, share: bool = True
) -> Packed:
    """:func:`pack` with every sharing ``attention`` takes (the template head, each job's σ); ``share=False``: none."""
    attention = attention or packed_attention(loaded)
    if not share or attention not in PREFIX_ATTENTIONS:
        return pack(segments, prompt_length)
    return pack(segments, prompt_length, sharable_prefix(loaded, segments, attention), share_sigma=True)


def scored_hidden(loaded, prompts: torch.Tensor, packed: Packed, attention: str | None = None) -> torch.Tensor:
    """Final hidden states ``[N, H]`` at the scored positions of a packed row.

    ``prompts [S, P, H]`` (fp32, may require grad) supplies σ; gradients reach only the slots used.
    ``attention`` overrides :func:`packed_attention`'s choice (an attention implementation name); a row packed with
    a shared prefix needs one of ``PREFIX_ATTENTIONS`` (see :func:`sharable_prefix`).
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
        extra = dict(fastsoft_buckets=length_buckets(packed.cu_seq_lens, device, packed.leads, len(packed.prefix)))
    if packed.prefix or packed.leads is not None:
        if attention not in PREFIX_ATTENTIONS:
            raise ValueError(f"attention {attention!r} does not take a shared prefix; pack the row without one")
        if packed.prefix:
            extra["fastsoft_prefix"] = shared_prefix(loaded, packed.prefix)
        if attention in VARLEN_ATTENTIONS:
            extra |= varlen_keys(packed.cu_seq_lens, len(packed.prefix), device, packed.leads)
    with attention_implementation(loaded, attention), fused_layers(loaded):
        hidden = loaded.hidden_states(
            inputs_embeds=embeds[None], position_ids=packed.position_ids.to(device)[None], **extra
        )[0]
    return hidden.index_select(0, packed.scored.to(device))
