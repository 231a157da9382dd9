"""Learning-rate schedule: linear warmup then cosine decay, a pure function of the step (nanoGPT style)."""

import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning rate for 0-based ``step`` of ``total_steps``: ``base_lr * (step + 1) / warmup`` during
    warmup, then a cosine from ``base_lr`` down to ``min_ratio * base_lr`` at the last step."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
