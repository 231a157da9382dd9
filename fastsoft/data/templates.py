"""Prompt templates with a context slot: the soft prompt takes exactly the place of the context.

A rendered template is three strings around two placeholders::

    head + CONTEXT + middle + QUERY + tail          (teacher: the context's tokens; student: σ)

``placement="template"`` puts the context where the chat template puts a user message's first words.
``placement="first"`` puts it before everything (σ at position 0), which is where PEFT prompt tuning
puts its virtual tokens, so an export behaves identically when loaded with PEFT.
Pieces are tokenised separately, and both teacher and student use the same pieces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fastsoft.errors import FastsoftError

PLACEMENTS = ("template", "first")  # where σ goes (--placement)
TEMPLATE_KINDS = ("auto", "chat", "plain")  # which template (--template)
_CONTEXT, _QUERY = "\x00FASTSOFT_CONTEXT\x00", "\x00FASTSOFT_QUERY\x00"


@dataclass(frozen=True)
class Template:
    head: str
    middle: str
    tail: str
    placement: str = "template"
    kind: str = "chat"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(repr((self.head, self.middle, self.tail, self.placement)).encode()).hexdigest()[:16]

    def split(self, query: str) -> tuple[str, str]:
        """Text before the context and text after it (query included) for one query."""
        if self.placement == "first":
            return "", self.head + self.middle + query + self.tail
        return self.head, self.middle + query + self.tail


def make_template(tokenizer, placement: str = "template", kind: str = "auto") -> Template:
    """The model's chat template with a context slot (``kind="chat"``), or a plain one for base models."""
    if placement not in PLACEMENTS:
        raise FastsoftError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if kind == "auto":
        kind = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise FastsoftError("this tokenizer has no chat template; use the plain template")
        messages = [{"role": "user", "content": f"{_CONTEXT}\n\n{_QUERY}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif kind == "plain":
        text = (tokenizer.bos_token or "") + f"{_CONTEXT}\n\nQuestion: {_QUERY}\nAnswer:"
    else:
        choices = ", ".join(TEMPLATE_KINDS[:-1]) + " or " + TEMPLATE_KINDS[-1]
        raise FastsoftError(f"unknown template kind {kind!r}; choose {choices}")
    head, rest = text.split(_CONTEXT)
    middle, tail = rest.split(_QUERY)
    return Template(head=head, middle=middle, tail=tail, placement=placement, kind=kind)


def end_token_ids(loaded) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids, else the tokenizer's."""
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise FastsoftError("the model defines no end-of-sequence token, so answers cannot be delimited")
    return ids


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a template piece, without the tokenizer adding special tokens of its own."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_query(tokenizer, template: Template, query: str) -> tuple[list[int], list[int]]:
    """Token ids before the context slot and after it (the query) for one query."""
    before, after = template.split(query)
    return encode(tokenizer, before), encode(tokenizer, after)
