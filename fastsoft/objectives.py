"""Training objectives, all run through ``fastsoft.ops.softmax_kl``.

- ``kl``: forward KL(teacher || student) against the cached teacher distributions;
- ``answer``: log-likelihood of the teacher's own greedy answer (one-hot targets);
- ``supervised``: log-likelihood of the given answers (plain prompt tuning).

A mixture is written ``kl:0.7,answer:0.3``. ``answer`` and ``supervised`` score different token
sequences, so they cannot be mixed with each other.
"""

from __future__ import annotations

from fastsoft.errors import FastsoftError

OBJECTIVES = ("kl", "answer", "supervised")


def parse_objective(text: str) -> dict[str, float]:
    """``"kl"`` -> ``{"kl": 1.0}``; ``"kl:0.7,answer:0.3"`` -> ``{"kl": 0.7, "answer": 0.3}``."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in OBJECTIVES:
            raise FastsoftError(f"unknown objective {name!r}; choose kl, answer or supervised, or a mixture like kl:0.7,answer:0.3")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise FastsoftError(f"objective weight {weight!r} of {name!r} is not a number") from None
        if value < 0 or name in weights:
            raise FastsoftError(f"objective {name!r} is repeated or has a negative weight")
        weights[name] = value
    if "answer" in weights and "supervised" in weights:
        raise FastsoftError("the answer and supervised objectives score different answers and cannot be mixed")
    if not any(weights.values()):
        raise FastsoftError("the objective weights are all zero")
    return weights
