"""The teacher cache: every kind round-trips, fingerprints and checksums refuse what does not belong."""

from __future__ import annotations

import json

import pytest
import torch

from fastsoft.data.templates import make_template
from fastsoft.errors import FastsoftError
from fastsoft.teacher.batching import Taught, teach
from fastsoft.teacher.cache import MARKER, TeacherCache, check_cache_folder
from fastsoft.teacher.targets import CacheSpec


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled", "hidden", "compact"])
def test_cache_kinds_round_trip(tiny, tiny_job, tmp_path, kind):
    template = make_template(tiny.tokenizer)
    train = teach(tiny, template, "j", tiny_job.context, tiny_job.queries[:3], None, max_new_tokens=4)
    held = teach(tiny, template, "j", tiny_job.context, tiny_job.eval_queries, None, max_new_tokens=4)
    spec = CacheSpec(kind=kind, top_k=8, samples=32)
    hidden = torch.cat([t.hidden for t in train])
    targets = spec.build(tiny.lm_weight, hidden, torch.Generator().manual_seed(0))
    fingerprint = {"model": tiny.fingerprint, "template": template.fingerprint, "kind": kind, "params": spec.params()}
    cache = TeacherCache(tmp_path, fingerprint, spec.target_type)
    cache.put("j", [1, 2, 3], train, targets, held, flush=False)
    assert not TeacherCache(tmp_path, fingerprint, spec.target_type).has(
        "j"
    )  # written, not yet indexed: it would be taught again
    cache.flush()
    got = TeacherCache(tmp_path, fingerprint, spec.target_type).get("j")
    assert [t.answer for t in got.train] == [t.answer for t in train]
    assert got.row_offsets[-1] == len(hidden) and got.context_ids == [1, 2, 3]
    torch.testing.assert_close(torch.cat([t.hidden for t in got.eval]), torch.cat([t.hidden for t in held]))
    teacher = got.targets
    probs = torch.softmax(tiny.logits(hidden), -1)
    if kind == "dense":
        torch.testing.assert_close(teacher.logprobs.exp(), probs, rtol=1e-5, atol=1e-6)
    elif kind == "hidden":
        torch.testing.assert_close(teacher.hidden, hidden)
    elif kind == "compact":  # wbar = sum q W and sum q log q at the spec's temperature, fp32
        assert teacher.wbar.dtype == teacher.neg_entropy.dtype == torch.float32 and teacher.temperature == 1.0
        torch.testing.assert_close(teacher.wbar, probs @ tiny.lm_weight.float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(teacher.neg_entropy, (probs * probs.log()).sum(-1), rtol=1e-4, atol=1e-6)
    elif kind == "topk":
        assert teacher.ids.shape[1] == 8
        torch.testing.assert_close(teacher.probs, probs.gather(1, teacher.ids.long()))
        torch.testing.assert_close(teacher.tail, 1 - teacher.probs.sum(-1), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(teacher.probs.sum(-1), torch.ones(len(hidden)))
        assert ((teacher.probs * 32) - (teacher.probs * 32).round()).abs().max() < 1e-5  # counts / samples
    other = {**fingerprint, "template": "something-else"}
    with pytest.raises(FastsoftError, match="another prompt template"):
        TeacherCache(tmp_path, other, spec.target_type)
    shard = tmp_path / "j.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FastsoftError, match="truncated or corrupted"):
        TeacherCache(tmp_path, fingerprint, spec.target_type).get("j")


# -- which folder is fastsoft's: the marker, and rebuilding deletes only the shards the index lists -----------------

HIDDEN = CacheSpec(kind="hidden")


def _fingerprint(template: str = "t") -> dict:
    return {"model": "m", "vocab_size": 8, "template": template, "kind": "hidden", "params": HIDDEN.params()}


def _fake_cache(root, job_ids, template: str = "t") -> TeacherCache:
    """A cache of shards written by :meth:`TeacherCache.put`, no model needed (hidden targets, two rows a job)."""
    cache = TeacherCache(root, _fingerprint(template), HIDDEN.target_type)
    for job_id in job_ids:
        train = [Taught([1], [2], [3, 4], torch.zeros(0))]
        held = [Taught([1], [2], [5], torch.ones(1, 4))]
        cache.put(job_id, [7, 8], train, HIDDEN.build(None, torch.randn(2, 4)), held)
    return cache


def _files(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.parametrize("rebuild", [False, True])
@pytest.mark.parametrize("foreign_index", [False, True])
def test_a_model_folder_is_refused_and_nothing_in_it_is_touched(tmp_path, rebuild, foreign_index):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    if foreign_index:  # an index.json of some other tool: what made the old --rebuild-cache delete the weights
        (tmp_path / "index.json").write_text('{"weight_map": {"w": "model.safetensors"}}')
    before = _files(tmp_path)
    with pytest.raises(FastsoftError, match=r"^--cache .* is not a fastsoft teacher cache.*choose an empty or new"):
        TeacherCache(tmp_path, _fingerprint(), HIDDEN.target_type, rebuild=rebuild)
    assert _files(tmp_path) == before  # nothing deleted, nothing written (no index, no marker)


def test_another_runs_output_folder_is_refused_and_nothing_in_it_is_touched(tmp_path):
    (tmp_path / ".fastsoft-run").write_text("{}")
    (tmp_path / "checkpoint.safetensors").write_bytes(b"checkpoint")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "job0").mkdir()
    (tmp_path / "job0" / "adapter_model.safetensors").write_bytes(b"prompt")
    before = _files(tmp_path)
    with pytest.raises(FastsoftError, match="is not a fastsoft teacher cache"):
        TeacherCache(tmp_path, _fingerprint(), HIDDEN.target_type, rebuild=True)
    assert _files(tmp_path) == before and (tmp_path / "job0" / "adapter_model.safetensors").exists()


def test_rebuilding_a_mismatched_cache_deletes_only_the_shards_its_index_lists(tmp_path):
    root = tmp_path / "cache"
    _fake_cache(root, ["a", "b"])
    (root / "x.safetensors").write_bytes(b"someone else's")
    (tmp_path / "victim.safetensors").write_bytes(b"outside the cache")
    index = json.loads((root / "index.json").read_text())
    # a tampered entry naming a file outside the folder is not a shard of fastsoft's either
    index["jobs"]["evil"] = {**index["jobs"]["a"], "file": "../victim.safetensors"}
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(FastsoftError, match="another prompt template"):
        TeacherCache(root, _fingerprint("other"), HIDDEN.target_type)
    cache = TeacherCache(root, _fingerprint("other"), HIDDEN.target_type, rebuild=True)
    assert not (root / "a.safetensors").exists() and not (root / "b.safetensors").exists()
    assert (root / "x.safetensors").read_bytes() == b"someone else's"
    assert (tmp_path / "victim.safetensors").read_bytes() == b"outside the cache"
    assert cache.index["jobs"] == {} and cache.index["fingerprint"]["template"] == "other"
    assert (root / MARKER).is_file()


def test_a_corrupted_index_in_a_marked_cache_is_replaced_and_no_file_deleted(tmp_path):
    _fake_cache(tmp_path, ["a"])
    (tmp_path / "x.safetensors").write_bytes(b"someone else's")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(FastsoftError, match="index .* is corrupted.*--rebuild-cache"):
        TeacherCache(tmp_path, _fingerprint(), HIDDEN.target_type)
    cache = TeacherCache(tmp_path, _fingerprint(), HIDDEN.target_type, rebuild=True)
    assert not cache.has("a") and json.loads((tmp_path / "index.json").read_text())["jobs"] == {}
    # an unreadable index proves no shard fastsoft's: they stay (a stale one is overwritten when its job is taught)
    assert (tmp_path / "a.safetensors").exists() and (tmp_path / "x.safetensors").read_bytes() == b"someone else's"


def test_a_cache_of_an_older_fastsoft_without_the_marker_opens_and_is_marked(tmp_path):
    _fake_cache(tmp_path / "old", ["a"])
    (tmp_path / "old" / MARKER).unlink()
    cache = TeacherCache(tmp_path / "old", _fingerprint(), HIDDEN.target_type)
    assert cache.get("a").context_ids == [7, 8] and (tmp_path / "old" / MARKER).is_file()
    # without the marker, a corrupted index proves nothing: the folder is not taken for a cache, even to rebuild
    _fake_cache(tmp_path / "broken", ["a"])
    (tmp_path / "broken" / MARKER).unlink()
    (tmp_path / "broken" / "index.json").write_text("[]")
    with pytest.raises(FastsoftError, match="is not a fastsoft teacher cache"):
        TeacherCache(tmp_path / "broken", _fingerprint(), HIDDEN.target_type, rebuild=True)
    assert (tmp_path / "broken" / "a.safetensors").exists()


def test_a_folder_holding_only_a_lock_and_leftovers_becomes_a_cache(tmp_path):
    (tmp_path / ".fastsoft.lock").write_text("{}")
    (tmp_path / ".a.safetensors.tmp4194303").write_bytes(b"half")
    cache = TeacherCache(tmp_path, _fingerprint(), HIDDEN.target_type)
    assert cache.index["jobs"] == {} and (tmp_path / MARKER).is_file() and check_cache_folder(tmp_path)


def test_a_folder_of_a_torchrun_runs_rank_caches_opens_as_a_cache_beside_them(tmp_path):
    for rank in (0, 1):
        TeacherCache(tmp_path / f"rank{rank}", {"vocab_size": 5}, object)
    check_cache_folder(tmp_path)  # a single process after a torchrun run on the same OUT/cache
    (tmp_path / "rank2").mkdir()  # an unmarked folder is not one of fastsoft's
    with pytest.raises(FastsoftError, match="not a fastsoft teacher cache"):
        check_cache_folder(tmp_path)
