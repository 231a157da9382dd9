"""The plateau rule: it compares whole passes over a job's training queries, never held-out ones."""

from __future__ import annotations

import fastsoft
from fastsoft.train.stopping import MIN_WINDOW_STEPS, pass_steps, plateau_window, plateaued


def test_windows_are_whole_passes_of_at_least_eight_steps():
    assert pass_steps(32, 4) == 8 and pass_steps(33, 4) == 9 and pass_steps(3, 4) == 1
    assert MIN_WINDOW_STEPS == 8
    assert plateau_window(32, 4) == 8 and plateau_window(16, 4) == 8 and plateau_window(12, 4) == 9
    assert plateau_window(40, 4) == 10 and plateau_window(5, 2) == 9


def test_plateau_compares_whole_passes():
    falling = [4.0] * 4 + [2.0] * 4  # the second pass halved the loss
    assert not plateaued(falling, 4, 0.05)
    flat = falling + [1.95] * 4  # then 2.5 %: below a 5 % threshold, above a 1 % one
    assert plateaued(flat, 4, 0.05) and not plateaued(flat, 4, 0.01)
    assert not plateaued(flat[:-1], 4, 0.05)  # only at the end of a pass
    assert not plateaued([1.0] * 7, 4, 0.5)  # never before two whole passes
    assert not plateaued(flat, 4, 0.0)  # 0: off
    assert plateaued(falling + [2.5] * 4, 4, 0.01)  # a rising loss has plateaued too


def test_a_run_stops_on_a_plateau(tiny, tiny_job, tmp_path):
    """With a threshold no pass can meet, the job stops after its second pass (and says why); with 0 it runs on."""
    train = dict(steps=40, prompt_length=4, max_new_tokens=4, lr=0.05, tol=0.0, batch_queries=2, progress=False)
    window = plateau_window(len(tiny_job.queries), 2)
    report = fastsoft.compress([tiny_job], tiny, tmp_path / "a", min_improvement=0.99, **train)[0]
    assert report["stop_reason"] == "plateau" and report["steps"] == 2 * window
    report = fastsoft.compress([tiny_job], tiny, tmp_path / "b", **train)[0]  # off by default
    assert report["stop_reason"] == "step budget" and report["steps"] == 40
