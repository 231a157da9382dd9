"""Greedy answers with a soft prompt in place of the context."""

from __future__ import annotations

import torch

from fastsoft.data.templates import Template, end_token_ids, tokenize_query
from fastsoft.frozen.layers import fused_layers
from fastsoft.frozen.prefix import shared_prefix

# Rows decoded together at most: the KV cache and the per-step logits grow with the rows of a batch, so many rows go
# through in consecutive batches of this many (a greedy row's ids do not depend on the rows beside it).
BATCH_ROWS = 32


def _row_embeds(loaded, prompt: torch.Tensor | None, before: list[int], after: list[int]) -> torch.Tensor:
    """``[len(before) + P + len(after), H]``: the embedded ids with ``prompt [P, H]`` (or nothing) between them."""
    embed = lambda ids: loaded.embed(torch.tensor(ids, dtype=torch.long, device=loaded.device))
    parts = [embed(before)]
    if prompt is not None:
        parts.append(prompt.to(device=loaded.device, dtype=parts[0].dtype))
    parts.append(embed(after))
    return torch.cat(parts)


@torch.no_grad()
def generate_batch_ids(
    loaded,
    prompt: torch.Tensor | None,
    rows: list[tuple[list[int], list[int]]],
    max_new_tokens: int = 64,
    share_prefix: bool = True,
    batch_rows: int = BATCH_ROWS,
) -> list[list[int]]:
    """Greedy answer ids of every ``(before, after)`` row, for ``before + prompt + after`` (``prompt [P, H]`` or
    None for no context), decoded ``batch_rows`` rows together, batch after batch in order: the ids
    :func:`generate_ids` gives row by row (up to rounding: other batch shapes). Each row stops at an end token;
    finished rows leave the batch.

    A batch's B rows are left-padded to its longest, ``L``, under a 2-D attention mask, with each row's own positions.
    ``share_prefix``: when every row of a batch has the same non-empty ``before``, its rows start from one copy each of
    the cached keys and values (:mod:`fastsoft.frozen.prefix`) and only ``prompt + after`` runs (the padding then sits
    between the prefix and the row, masked out). The model runs with its fused layer ops
    (:func:`fastsoft.frozen.layers.fused_layers`).
    Memory: the KV cache of ``B × (Lp + L + max_new_tokens)`` positions, ``B <= batch_rows``, and ``[B, V]`` fp32
    logits per step, whatever the number of rows; on CPU the first call packs the frozen weights once (their size
    again: :func:`fastsoft.ops.layers.frozen_linear`)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, not {batch_rows}")
    with fused_layers(loaded):
        return [
            ids
            for start in range(0, len(rows), batch_rows)
            for ids in _greedy(loaded, prompt, rows[start : start + batch_rows], max_new_tokens, share_prefix)
        ]


def _greedy(loaded, prompt, rows, max_new_tokens: int, share_prefix: bool) -> list[list[int]]:
    device = loaded.device
    if not rows or max_new_tokens < 1:
        return [[] for _ in rows]
    start, offset = {}, 0
    head = [int(i) for i in rows[0][0]]
    if share_prefix and head and all(list(before) == head for before, _ in rows):
        cache = shared_prefix(loaded, head).kv_cache()  # a copy: the decoder extends it in place
        cache.reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=device))  # one copy per row
        start, offset, rows = loaded.kv_cache_arg(cache), len(head), [([], after) for _, after in rows]
    embeds = [_row_embeds(loaded, prompt, before, after) for before, after in rows]
    width = max(len(e) for e in embeds)
    inputs = embeds[0].new_zeros(len(rows), width, embeds[0].shape[-1])
    mask = torch.ones(len(rows), offset + width, dtype=torch.long, device=device)
    for i, e in enumerate(embeds):
        inputs[i, width - len(e) :] = e
        mask[i, offset : offset + width - len(e)] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, offset:]  # as if alone: padding does not count
    out = loaded.decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True, **start)
    ends, answers = set(end_token_ids(loaded)), [[] for _ in rows]
    live = list(range(len(rows)))  # the answer each batch row writes
    while True:
        tokens = loaded.logits(out.last_hidden_state[:, -1]).argmax(-1).tolist()
        keep = []
        for j, (i, token) in enumerate(zip(live, tokens)):
            answers[i].append(token)
            if token not in ends and len(answers[i]) < max_new_tokens:
                keep.append(j)
        if not keep:
            return answers
        cache = loaded.kv_cache(out)
        if len(keep) < len(live):  # finished rows stop costing compute
            index = torch.tensor(keep, device=device)
            cache.reorder_cache(index)
            mask, positions = mask[index], positions[index]
            live, tokens = [live[j] for j in keep], [tokens[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        positions = positions[:, -1:] + 1
        out = loaded.decoder(
            input_ids=torch.tensor(tokens, device=device)[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **loaded.kv_cache_arg(cache),
        )


def generate_ids(
    loaded,
    prompt: torch.Tensor | None,
    before: list[int],
    after: list[int],
    max_new_tokens: int = 64,
    share_prefix: bool = True,
) -> list[int]:
    """Greedy answer ids for ``before + prompt + after`` (``prompt [P, H]`` or None for no context): a one-row
    :func:`generate_batch_ids`. ``share_prefix``: start from the cached keys and values of ``before``
    (:mod:`fastsoft.frozen.prefix`) instead of running it again."""
    return generate_batch_ids(loaded, prompt, [(before, after)], max_new_tokens, share_prefix)[0]


def answer_text(loaded, ids: list[int]) -> str:
    ends = set(end_token_ids(loaded))
    return loaded.tokenizer.decode([t for t in ids if t not in ends], skip_special_tokens=True).strip()


def generate(
    loaded,
    template: Template,
    prompt: torch.Tensor | None,
    query: str,
    max_new_tokens: int = 64,
    share_prefix: bool = True,
) -> str:
    """The model's greedy answer to ``query`` with ``prompt [P, H]`` standing in the context's place."""
    before, after = tokenize_query(loaded.tokenizer, template, query)
    return answer_text(loaded, generate_ids(loaded, prompt, before, after, max_new_tokens, share_prefix))
