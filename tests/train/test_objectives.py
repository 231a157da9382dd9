"""Objective mixtures: parsing and refusals."""

from __future__ import annotations

import pytest

from fastsoft.errors import FastsoftError
from fastsoft.train.objectives import parse_objective


def test_objective_parsing():
    assert parse_objective("kl") == {"kl": 1.0}
    assert parse_objective("kl:0.7,answer:0.3") == {"kl": 0.7, "answer": 0.3}
    for bad in ("kld", "kl:x", "answer,supervised", "kl:0"):
        with pytest.raises(FastsoftError):
            parse_objective(bad)
