"""When a job stops training: the step budget, convergence, or a plateau of its own training loss.

None of these looks at held-out queries. The plateau rule compares whole passes over the job's training queries
(``ceil(queries / batch)`` steps each): per-step losses are means over different minibatches and too noisy to compare
one by one, while two passes score the same queries.
"""

from __future__ import annotations

import math


def pass_steps(train_queries: int, batch_queries: int) -> int:
    """Steps in one pass over a job's training queries."""
    return max(1, math.ceil(train_queries / batch_queries))


def plateaued(losses: list[float], window: int, min_improvement: float) -> bool:
    """Whether the last pass (``window`` steps) lowered the mean training loss by less than ``min_improvement`` (a
    share) of the pass before it. Checked at pass boundaries only; never before two whole passes; 0 turns it off."""
    n = len(losses)
    if min_improvement <= 0 or n < 2 * window or n % window:
        return False
    last = sum(losses[-window:]) / window
    before = sum(losses[-2 * window : -window]) / window
    return last > (1 - min_improvement) * before
