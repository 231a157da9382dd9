"""The teacher cache: every kind round-trips, fingerprints and checksums refuse what does not belong."""

from __future__ import annotations

import pytest
import torch

from fastsoft.data.templates import make_template
from fastsoft.errors import FastsoftError
from fastsoft.teacher.batching import teach
from fastsoft.teacher.cache import TeacherCache
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
