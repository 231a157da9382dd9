"""Templates: σ takes exactly the context's place."""

from __future__ import annotations

import pytest

from fastsoft.data.templates import make_template
from fastsoft.errors import FastsoftError


def test_templates_put_sigma_exactly_where_the_context_was(tiny):
    chat = make_template(tiny.tokenizer)
    assert (
        chat.kind == "chat"
        and chat.head.endswith("<|im_start|>user\n")
        and chat.tail.endswith("<|im_start|>assistant\n")
    )
    before, after = chat.split("Q?")
    assert before == chat.head and after == chat.middle + "Q?" + chat.tail
    first = make_template(tiny.tokenizer, placement="first")
    assert first.split("Q?") == ("", chat.head + chat.middle + "Q?" + chat.tail)
    plain = make_template(tiny.tokenizer, kind="plain")
    assert plain.split("Q?")[1] == "\n\nQuestion: Q?\nAnswer:"
    with pytest.raises(FastsoftError, match="placement"):
        make_template(tiny.tokenizer, placement="middle")
