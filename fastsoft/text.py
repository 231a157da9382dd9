"""Text utilities every stage may use: ROUGE-L of free answers (evaluation scores answers with it, self-study drops
near-duplicate requests with it)."""

from __future__ import annotations


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)
