"""The teacher pass: the frozen model with the full context, at every scored (answer) position.

For each query the teacher sees ``before + context + after + answer``. With no answer given it generates
its greedy answer, and the final hidden state at each generation step *is* the teacher's distribution
for that answer token (logits = hidden @ lm_head.T), so no second pass is needed. Outputs are final
hidden states; ``targets.py``-style kinds (dense, top-k, sampled, hidden) are derived from them.
"""

from __future__ import annotations

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
          max_new_tokens: int = 64) -> list[Taught]:
    """Teacher hidden states at the answer positions of every query (greedy answers when none are given)."""
    tokenizer, device = loaded.tokenizer, loaded.device
    context_ids = encode(tokenizer, context)
    ends = end_token_ids(loaded)
    taught = []
    for i, query in enumerate(queries):
        before, after = tokenize_query(tokenizer, template, query)
        prompt = before + context_ids + after
        if answers is not None:
            answer = encode(tokenizer, answers[i]) + [ends[0]]
            check_length(loaded, job_id, len(prompt) + len(answer), "context + query + answer")
            ids = torch.tensor([prompt + answer], device=device)
            hidden = loaded.hidden_states(input_ids=ids)[0, len(prompt) - 1 : -1].float()
        else:
            check_length(loaded, job_id, len(prompt) + max_new_tokens, "context + query + answer budget")
            answer, hidden = _greedy(loaded, prompt, ends, max_new_tokens)
        taught.append(Taught(before, after, answer, hidden))
    return taught


def _greedy(loaded, prompt: list[int], ends: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with a KV cache; returns the answer ids and the hidden state that predicted each."""
    ids = torch.tensor([prompt], device=loaded.device)
    out = loaded.decoder(input_ids=ids, use_cache=True)
    answer, states = [], []
    while True:
        state = out.last_hidden_state[0, -1].float()
        token = int(loaded.logits(state).argmax())
        answer.append(token)
        states.append(state)
        if token in ends or len(answer) >= max_new_tokens:
            break
        out = loaded.decoder(input_ids=torch.tensor([[token]], device=loaded.device), past_key_values=out.past_key_values, use_cache=True)
    return answer, torch.stack(states)
