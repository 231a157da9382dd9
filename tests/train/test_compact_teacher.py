"""The compact teacher (wbar, sum q log q at the loss temperature) trains like the dense one: same maths, other rounding.

A seeded 6-step run of three jobs in two slots with ``teacher="compact"`` gives the per-step losses of the same run
with ``teacher="dense"`` within 1e-5 relative plus the compact loss's fp32 floor (:data:`ATOL`), at the default
temperature and another one, also mixed with the answer objective (whose one-hot targets do not depend on the
teacher kind).
"""

from __future__ import annotations

import importlib

import pytest
from conftest import CORPUS

import fastsoft
from fastsoft.config import CompressConfig
from fastsoft.ops import CompactTarget
from fastsoft.teacher.targets import CacheSpec

# The compact loss is neg_entropy - h.wbar/T + lse: a difference of O(|z|) fp32 terms whose logits' rounding does not
# cancel as it does inside the dense sum_v q_v (a_v - z_v), so its absolute floor is a few ulps of the logits (about
# 2.4e-7 at |z| ~ 4) whatever the KL. The tiny model's KL is ~1e-4, where 1e-5 relative is 1e-9: below that floor.
# Measured: at most 9e-7 apart over the 6 steps, not growing (the gradients, hence the trajectories, agree).
ATOL = 2e-6


def _jobs():
    words = (" ".join(CORPUS[:2]) * 2).split()
    queries = ["What colour are the doors?", "Who is the mayor?", "How many goats?", "When is the festival?"]
    return [
        fastsoft.Job(f"job{i}", " ".join(words[i:] + words[:i]), queries, eval_queries=["Name the mayor."])
        for i in range(3)
    ]


def _losses(model, out, **settings):
    reports = fastsoft.compress(
        _jobs(), model, out, steps=6, prompt_length=4, max_new_tokens=4, batch_queries=2, slots=2, tol=0.0,
        progress=False, **settings,
    )  # fmt: skip
    return {r["job_id"]: [float(x) for x in r["losses"]] for r in reports}


@pytest.mark.parametrize("objective,temperature", [("kl", 1.0), ("kl", 2.0), ("kl:0.7,answer:0.3", 1.0)])
def test_compact_teacher_gives_the_dense_teacher_losses(tiny, tmp_path, objective, temperature):
    kw = dict(objective=objective, temperature=temperature)
    dense = _losses(tiny, tmp_path / "dense", teacher="dense", **kw)
    compact = _losses(tiny, tmp_path / "compact", teacher="compact", **kw)
    assert dense.keys() == compact.keys()
    for job in dense:
        assert len(dense[job]) == len(compact[job]) == 6
        for step, (d, c) in enumerate(zip(dense[job], compact[job])):
            assert abs(c - d) <= 1e-5 * abs(d) + ATOL, f"{job} step {step}: compact {c!r} vs dense {d!r}"


def test_compact_is_the_default_teacher_and_keyed_by_temperature():
    assert CompressConfig().teacher == "compact"
    spec = CacheSpec(kind="compact", temperature=2.0)
    assert spec.target_type is CompactTarget and spec.params() == {"temperature": 2.0}


def test_grad_filter_reaches_the_loss_and_keeps_the_losses(tiny, tmp_path, monkeypatch):
    op = importlib.import_module("fastsoft.ops.softmax_kl")  # the module (fastsoft.ops.softmax_kl is also the function)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return filtered_rows(*args, **kwargs)

    filtered_rows = op.filtered_rows
    monkeypatch.setattr(op, "filtered_rows", counting)
    exact = _losses(tiny, tmp_path / "exact", teacher="compact")
    assert not calls  # 0, the default, is exact: the filter is never entered
    filtered = _losses(tiny, tmp_path / "filtered", teacher="compact", grad_filter=1e-3)
    assert calls and set(calls) == {1e-3}
    for job in exact:
        for d, c in zip(exact[job], filtered[job]):
            assert abs(c - d) <= 1e-3 * abs(d) + ATOL
