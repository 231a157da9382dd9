"""Loading the frozen model: frozen, fingerprinted, clear errors for bad paths."""

from __future__ import annotations

import pytest

import fastsoft
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


def test_a_truncated_gguf_is_named_truncated(tmp_path):
    pytest.importorskip("gguf")
    from fastsoft.frozen.loading import default_model_path, load_model

    try:
        source = default_model_path()
    except fastsoft.FastsoftError as error:
        pytest.fail(f"the default model is part of the test install: {error}")
    cut = tmp_path / "half.gguf"
    with open(source, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(source.stat().st_size // 2))
    with pytest.raises(fastsoft.FastsoftError, match="is truncated or damaged"):
        load_model(cut)
