"""The student step: segments of many jobs packed into one row, each with its own soft prompt written in.

One segment is ``before + σ(slot) + after + answer``. Segments are concatenated with no padding;
``position_ids`` restart at 0 per segment and ``use_cache=False`` makes transformers derive the
packed-sequence mask from them (with its default cache, sdpa/eager/flex silently let segments attend
to each other). Only the final hidden states at scored positions leave this module: the loss needs
nothing else, and logits are never formed here.

Attention, chosen per call by :func:`fastsoft.attention.packed_attention`: flash-attn varlen when the model
was loaded with ``attn_implementation="flash_attention_2"`` (``cu_seq_lens_*`` passed, no mask built); on CUDA
otherwise torch's own varlen flash kernel for fp16/bf16; else, for an sdpa model (CPU, fp32 on GPU), one causal
sdpa call per length bucket. Eager/flex models keep their own implementation and the mask transformers
derives from the restarting ``position_ids``.

Shared frozen prefix (:mod:`fastsoft.prefix`): when every segment's ``before`` is the same template head and the
attention is one of fastsoft's packed layouts, the head is left out of the row; its keys and values are computed once
per model and every segment attends to them first (positions continue after it). :func:`sharable_prefix` decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastsoft.attention import (
    BUCKETS_ATTENTION,
    PREFIX_ATTENTIONS,
    VARLEN_ATTENTIONS,
    attention_implementation,
    length_buckets,
    packed_attention,
    prefix_varlen_keys,
)
from fastsoft.prefix import shared_prefix


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
    position_ids: torch.Tensor  # [L] restarting at 0 per segment
    scored: torch.Tensor  # [N] positions whose hidden state is scored
    segment_of_row: torch.Tensor  # [N] segment index of each scored row
    cu_seq_lens: torch.Tensor  # [B + 1] int32 segment boundaries (for varlen attention kernels)
    prefix: tuple[int, ...] = ()  # the shared frozen prefix every segment attends to first (left out of the row)


def sharable_prefix(loaded, segments: list[Segment], attention: str | None = None) -> tuple[int, ...]:
    """The tokens every segment starts with (its whole ``before``, when they all have the same one) if the attention
    implementation takes a shared prefix; else ``()``."""
    first = segments[0].before if segments else []
    if not first or any(seg.before != first for seg in segments[1:]):
        return ()
    return tuple(first) if (attention or packed_attention(loaded)) in PREFIX_ATTENTIONS else ()


def pack(segments: list[Segment], prompt_length: int, prefix: tuple[int, ...] = ()) -> Packed:
    """Concatenate ``segments`` into one row; with ``prefix`` (each segment's ``before`` starts with it) those tokens
    are left out and positions start at ``len(prefix)``."""
    shared = len(prefix)
    ids, sigma_rows, positions, scored, owner, bounds = [], [], [], [], [], [0]
    for index, seg in enumerate(segments):
        if shared and tuple(seg.before[:shared]) != tuple(prefix):
            raise ValueError(f"segment {index} does not start with the shared prefix")
        before = seg.before[shared:]
        start = len(ids)
        sigma = prompt_length if seg.slot is not None else 0
        ids += before + [0] * sigma + seg.after + seg.answer
        sigma_rows += (
            [-1] * len(before)
            + [seg.slot * prompt_length + j for j in range(sigma)]
            + [-1] * (len(seg.after) + len(seg.answer))
        )
        positions += range(shared, shared + len(ids) - start)
        first = start + len(before) + sigma + len(seg.after) - 1
        scored += range(first, first + len(seg.answer))
        owner += [index] * len(seg.answer)
        bounds.append(len(ids))
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)
    return Packed(
        as_long(ids),
        as_long(sigma_rows),
        as_long(positions),
        as_long(scored),
        as_long(owner),
        torch.tensor(bounds, dtype=torch.int32),
        tuple(prefix),
    )


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
        extra = dict(fastsoft_buckets=length_buckets(packed.cu_seq_lens, device))
    if packed.prefix:
        if attention not in PREFIX_ATTENTIONS:
            raise ValueError(f"attention {attention!r} does not take a shared prefix; pack the row without one")
        extra["fastsoft_prefix"] = shared_prefix(loaded, packed.prefix)
        if attention in VARLEN_ATTENTIONS:
            extra |= prefix_varlen_keys(packed.cu_seq_lens, len(packed.prefix), device)
    with attention_implementation(loaded, attention):
        hidden = loaded.hidden_states(
            inputs_embeds=embeds[None], position_ids=packed.position_ids.to(device)[None], **extra
        )[0]
    return hidden.index_select(0, packed.scored.to(device))
