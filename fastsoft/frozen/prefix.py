"""The shared frozen prefix: the template head's keys and values, computed once per model and template.

With the default placement every student segment is ``head + σ + query + answer``, and the head (the chat template's
system prompt and turn start; 24 tokens on SmolLM2) is the same for every query of every job. Its keys and values do
not depend on σ and never need a gradient, so they are computed once, by one no-grad forward of the head, and every
segment of every step attends to them instead of running those tokens again: the head never goes forward or
backward through the layers' projections and MLPs in training, evaluation or generation.

Exact: a head token attends only to earlier head tokens, so its keys and values are the same alone as inside any
segment, and the segment's own positions simply continue after the head (rotary embeddings see the positions they
saw before). Only rounding differs (other batch shapes).

The attention side is :mod:`fastsoft.frozen.attention` (``fastsoft_prefix=`` of its packed implementations); placement
``first`` (σ at position 0) has no head before σ, and eager/flex or flash-attn models keep their own attention, so
those run without it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedPrefix:
    """The keys and values of ``ids`` in every layer of a frozen model.

    ``keys[i]`` / ``values[i]``: ``[KV, Lp, D]`` in the model's dtype and device, after the rotary embedding (what a
    KV cache holds). Memory: ``2 · layers · KV · Lp · D`` numbers (SmolLM2, 24 tokens: 1.1 MB in fp32).
    """

    ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    cache: object  # the decoder's own KV cache of ``ids``: generation continues from a copy of it

    def __len__(self) -> int:
        return len(self.ids)

    def kv_cache(self):
        """A fresh copy of the prefix's KV cache, for a decoder call that goes on to extend it."""
        return copy.deepcopy(self.cache)


@torch.no_grad()
def shared_prefix(loaded, ids) -> SharedPrefix:
    """The :class:`SharedPrefix` of token ``ids`` on ``loaded``; computed on first use, then kept on the model."""
    ids = tuple(int(i) for i in ids)
    found = loaded.prefixes.get(ids)
    if found is not None:
        return found
    output = loaded.decoder(input_ids=torch.tensor([ids], device=loaded.device), use_cache=True)
    cache = loaded.kv_cache(output)
    layers = cache.layers
    prefix = SharedPrefix(
        ids,
        tuple(layer.keys[0].detach() for layer in layers),
        tuple(layer.values[0].detach() for layer in layers),
        cache,
    )
    loaded.prefixes[ids] = prefix
    return prefix
