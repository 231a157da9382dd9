"""When a job stops training: the step budget, convergence, or a plateau of its own training loss.

None of these looks at held-out queries. The plateau rule compares windows of whole passes over the job's training
queries (``ceil(queries / batch)`` steps a pass, as many passes as make :data:`MIN_WINDOW_STEPS`): per-step losses are
means over different minibatches and too noisy to compare one by one, while two windows score the same queries.
The retired ``bench_curves`` study measured the window and thresholds on two contexts; the rule is off by default
because it stopped self-study jobs too early (benchmarks/RESULTS.md, "Learning rate, step budget and the plateau rule").
"""

from __future__ import annotations

import math

MIN_WINDOW_STEPS = 8  # one 4-step pass (16 queries) was too noisy: the rule stopped a still-improving job at step 20


def pass_steps(train_queries: int, batch_queries: int) -> int:
    """Steps in one pass over a job's training queries."""
    return max(1, math.ceil(train_queries / batch_queries))


def plateau_window(train_queries: int, batch_queries: int) -> int:
    """Steps the plateau rule averages: whole passes, at least :data:`MIN_WINDOW_STEPS`."""
    one = pass_steps(train_queries, batch_queries)
    return one * math.ceil(MIN_WINDOW_STEPS / one)


def plateaued(losses: list[float], window: int, min_improvement: float) -> bool:
    """Whether the last ``window`` steps (:func:`plateau_window`) lowered the mean training loss by less than
    ``min_improvement`` (a share) of the window before them. Checked at window boundaries only; never before two
    whole windows; 0 turns it off."""
    n = len(losses)
    if min_improvement <= 0 or n < 2 * window or n % window:
        return False
    last = sum(losses[-window:]) / window
    before = sum(losses[-2 * window : -window]) / window
    return last > (1 - min_improvement) * before
