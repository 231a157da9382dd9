"""Loading the frozen model: frozen, fingerprinted, clear errors for bad paths."""

from __future__ import annotations

import pytest

from fastsoft.errors import FastsoftError
from fastsoft.frozen.loading import load_model


def test_model_is_frozen_and_fingerprinted(tiny, tiny_model_dir):
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert tiny.fingerprint == load_model(tiny_model_dir).fingerprint
    assert tiny.lm_weight.shape == (tiny.vocab_size, 64)


def test_fingerprint_is_the_content_not_the_folder(tiny, tiny_model_dir, tmp_path):
    """A teacher cache built on a model stays valid when the model folder moves (or is a converted GGUF copy)."""
    import shutil

    moved = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    assert load_model(moved).fingerprint == tiny.fingerprint


def test_model_path_errors(tmp_path):
    with pytest.raises(FastsoftError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FastsoftError, match="neither"):
        load_model(tmp_path)
