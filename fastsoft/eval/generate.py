"""Greedy answers with a soft prompt in place of the context."""

from __future__ import annotations

import torch

from fastsoft.data.templates import Template, end_token_ids, tokenize_query
from fastsoft.prefix import shared_prefix


@torch.no_grad()
def generate_ids(
    loaded,
    prompt: torch.Tensor | None,
    before: list[int],
    after: list[int],
    max_new_tokens: int = 64,
    share_prefix: bool = True,
) -> list[int]:
    """Greedy answer ids for ``before + prompt + after`` (``prompt [P, H]`` or None for no context).
    ``share_prefix``: start from the cached keys and values of ``before`` (:mod:`fastsoft.prefix`) instead of
    running it again."""
    device, embed = loaded.device, loaded.embed
    start = {}
    if share_prefix and before:
        start, before = loaded.kv_cache_arg(shared_prefix(loaded, before).kv_cache()), []
    parts = [embed(torch.tensor(before, dtype=torch.long, device=device))]
    if prompt is not None:
        parts.append(prompt.to(device=device, dtype=parts[0].dtype))
    parts.append(embed(torch.tensor(after, dtype=torch.long, device=device)))
    out = loaded.decoder(inputs_embeds=torch.cat(parts)[None], use_cache=True, **start)
    ends, answer = set(end_token_ids(loaded)), []
    while len(answer) < max_new_tokens:
        token = int(loaded.logits(out.last_hidden_state[0, -1]).argmax())
        answer.append(token)
        if token in ends:
            break
        out = loaded.decoder(
            input_ids=torch.tensor([[token]], device=device),
            use_cache=True,
            **loaded.kv_cache_arg(loaded.kv_cache(out)),
        )
    return answer


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
