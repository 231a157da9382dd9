"""The rkl and jsd objectives: parsing, the settings check, and training through ``fastsoft.compress``."""

from __future__ import annotations

import pytest

import fastsoft
from fastsoft.config import CompressConfig
from fastsoft.errors import FastsoftError
from fastsoft.train.objectives import divergence_of, parse_objective

TRAIN = dict(steps=12, prompt_length=4, max_new_tokens=5, lr=0.05, tol=0.0, batch_queries=5, progress=False)


def test_parsing_and_divergences():
    assert parse_objective("rkl") == {"rkl": 1.0}
    assert parse_objective("kl:0.5,rkl:0.5") == {"kl": 0.5, "rkl": 0.5}
    assert parse_objective("jsd") == parse_objective("jsd@0.5") == {"jsd": 1.0}
    assert parse_objective("jsd@0.3:0.7,answer:0.3") == {"jsd@0.3": 0.7, "answer": 0.3}
    assert [divergence_of(n) for n in ("kl", "rkl", "jsd", "jsd@0.3", "answer")] == [
        ("forward", 0.5),
        ("reverse", 0.5),
        ("jsd", 0.5),
        ("jsd", 0.3),
        None,
    ]
    for bad, match in [
        ("jsd@1", "strictly between 0 and 1"),
        ("jsd@0", "strictly between 0 and 1"),
        ("jsd@nan", "strictly between 0 and 1"),
        ("jsd@x", "is not a number"),
        ("rkl@0.3", "unknown objective"),
        ("jsd,jsd@0.5", "twice"),
    ]:
        with pytest.raises(FastsoftError, match=match):
            parse_objective(bad)


@pytest.mark.parametrize("teacher", ["compact", "topk", "sampled"])
@pytest.mark.parametrize("objective", ["rkl", "kl:0.5,jsd@0.3:0.5"])
def test_settings_refuse_a_teacher_that_is_not_dense_or_hidden(objective, teacher):
    name = objective.split(",")[-1].split(":")[0]
    with pytest.raises(FastsoftError) as error:
        CompressConfig(objective=objective, teacher=teacher)
    assert str(error.value) == (
        f"--objective {name} needs --teacher dense or hidden (it is not linear in the teacher); got --teacher {teacher}"
    )
    CompressConfig(objective=objective, teacher="dense")
    CompressConfig(objective=objective, teacher="hidden")


@pytest.mark.parametrize(
    "objective",
    [
        "rkl",
        "jsd",
        "kl:0,rkl:1",
        "kl:0,jsd:1",
        "kl:0,jsd@0.3:1",
        "kl:0.5,rkl:0.5",
    ],
)
def test_divergence_objectives_train(tiny, tiny_job, tmp_path, objective):
    report = fastsoft.compress([tiny_job], tiny, tmp_path, objective=objective, teacher="dense", **TRAIN)[0]
    assert report["losses"][-1] < report["losses"][0]
