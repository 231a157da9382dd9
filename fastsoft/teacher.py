"""The teacher pass: the frozen model with the full context, at every scored (answer) position.

For each query the teacher sees ``before + context + after + answer``. With no answer given it generates
its greedy answer, and the final hidden state at each generation step *is* the teacher's distribution
for that answer token (logits = hidden @ lm_head.T), so no second pass is needed. Outputs are final
hidden states; ``targets.py``-style kinds (dense, top-k, sampled, hidden) are derived from them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fastsoft.errors import FastsoftError
from fastsoft.templates import Template, encode, end_token_ids


@dataclass
class Taught:
    """One query as the teacher answered it.

    before: ids before the context slot; after: ids between the slot and the answer (the query);
    answer: the scored ids (answer + end token); hidden: ``[len(answer), H]`` fp32 teacher final hidden
    states predicting each answer token.
    """

    before: list[int]
    after: list[int]
    answer: list[int]
    hidden: torch.Tensor


def tokenize_query(tokenizer, template: Template, query: str) -> tuple[list[int], list[int]]:
    before, after = template.split(query)
    return encode(tokenizer, before), encode(tokenizer, after)


def check_length(loaded, job_id: str, length: int, what: str) -> None:
    limit = loaded.max_length
    if limit is not None and length > limit:
        raise FastsoftError(f"job {job_id!r}: {what} is {length} tokens, longer than the model's maximum of {limit}")


@torch.no_grad()
def teach(loaded, template: Template, job_id: str, context: str, queries: list[str], answers: list[str] | None = None,
          max_new_tokens: int = 64, batch_size: int = 32) -> list[Taught]:
    """Teacher hidden states at the answer positions of every query (greedy answers when none are given).

    The shared prefix ``before + context`` is encoded once; its KV cache is repeated over a batch of
    queries, whose suffixes are right-padded (pads masked out) and, without answers, decoded greedily
    together. Memory: one prefix cache per batch row, ``[B, layers, 2, L, kv_dim]``.
    """
    tokenizer = loaded.tokenizer
    context_ids = encode(tokenizer, context)
    split = [tokenize_query(tokenizer, template, q) for q in queries]
    if not split:
        return []
    prefix = split[0][0] + context_ids  # `before` does not depend on the query
    ends = end_token_ids(loaded)
    given = [encode(tokenizer, a) + [ends[0]] for a in answers] if answers is not None else None
    for i, (_, after) in enumerate(split):
        total = len(prefix) + len(after) + (len(given[i]) if given else max_new_tokens)
        check_length(loaded, job_id, total, "context + query + answer" if given else "context + query + answer budget")
    cache = loaded.decoder(input_ids=torch.tensor([prefix], device=loaded.device), use_cache=True).past_key_values
    taught = []
    for start in range(0, len(queries), batch_size):
        rows = range(start, min(len(queries), start + batch_size))
        afters = [split[i][1] for i in rows]
        if given:
            answers_b = [given[i] for i in rows]
            hidden = _forced(loaded, cache, len(prefix), afters, answers_b)
        else:
            answers_b, hidden = _greedy(loaded, cache, len(prefix), afters, ends, max_new_tokens)
        taught += [Taught(split[0][0], after, answer, h) for after, answer, h in zip(afters, answers_b, hidden)]
    return taught


def _extend(loaded, cache, prefix_length: int, suffixes: list[list[int]]):
    """Run right-padded suffixes on a copy of the prefix cache repeated per row; returns (output, mask)."""
    batch, width = len(suffixes), max(len(s) for s in suffixes)
    device = loaded.device
    rows = copy.deepcopy(cache)
    rows.batch_repeat_interleave(batch)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in suffixes], device=device)
    real = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in suffixes], device=device)
    mask = torch.cat([torch.ones(batch, prefix_length, dtype=torch.long, device=device), real], 1)
    positions = prefix_length + torch.arange(width, device=device).expand(batch, width)
    out = loaded.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=rows, use_cache=True)
    return out, mask


def _forced(loaded, cache, prefix_length: int, afters: list[list[int]], answers: list[list[int]]) -> list[torch.Tensor]:
    """Teacher forcing: the hidden states that predict each given answer token."""
    out, _ = _extend(loaded, cache, prefix_length, [a + y for a, y in zip(afters, answers)])
    return [out.last_hidden_state[i, len(a) - 1 : len(a) + len(y) - 1].float() for i, (a, y) in enumerate(zip(afters, answers))]


def _greedy(loaded, cache, prefix_length: int, afters: list[list[int]], ends: list[int], max_new_tokens: int):
    """Batched greedy decoding; a row stops at an end token or the budget. Returns answer ids and hidden states."""
    device, batch = loaded.device, len(afters)
    out, mask = _extend(loaded, cache, prefix_length, afters)
    lengths = torch.tensor([len(a) for a in afters], device=device)
    state = out.last_hidden_state[torch.arange(batch, device=device), lengths - 1].float()  # [B, H]
    answers, states = [[] for _ in range(batch)], [[] for _ in range(batch)]
    running = list(range(batch))
    for step in range(max_new_tokens):
        tokens = loaded.logits(state).argmax(-1)  # [B]
        for i in list(running):
            answers[i].append(int(tokens[i]))
            states[i].append(state[i])
            if answers[i][-1] in ends or len(answers[i]) >= max_new_tokens:
                running.remove(i)
        if not running:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], 1)
        positions = (prefix_length + lengths + step)[:, None]
        out = loaded.decoder(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values,
                             use_cache=True)
        state = out.last_hidden_state[:, -1].float()
    return answers, [torch.stack(s) for s in states]
