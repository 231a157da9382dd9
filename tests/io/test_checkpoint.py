"""Checkpoints hold tensors and JSON, never pickle: nothing in the package (or its tests) unpickles."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_pickle_loading_anywhere():
    unsafe = "weights_only" + "=False"
    offenders = [
        str(p) for p in [*ROOT.glob("fastsoft/**/*.py"), *ROOT.glob("tests/**/*.py")] if unsafe in p.read_text()
    ]
    offenders += [str(p) for p in ROOT.glob("fastsoft/**/*.py") if "import pickle" in p.read_text()]
    assert not offenders
