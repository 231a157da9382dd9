"""Packed student steps: exact packing (losses and gradients equal separate runs), the shared frozen prefix (the same
losses and gradients as without it), attention choice, determinism."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import fastsoft.frozen.attention as attention_mod
from fastsoft.frozen.packing import Segment, pack, pack_shared, scored_hidden, sharable_prefix, sigma_leads
from fastsoft.ops import SparseTarget, softmax_kl
from fastsoft.train.objectives import job_loss_sums

ATTENTIONS = ["sdpa", "fastsoft_buckets", "fastsoft_varlen:new", "fastsoft_varlen:old"]


def _attention(name, monkeypatch):
    if not name.startswith(attention_mod.VARLEN_ATTENTION):
        return name
    monkeypatch.setattr(attention_mod, "_torch_varlen", lambda: _fake_varlen(name.endswith("new")))
    return attention_mod.VARLEN_ATTENTION


def _fake_varlen(new_api: bool):
    """torch.nn.attention.varlen.varlen_attn stand-in for CPU (per-segment sdpa), in its 2.10 or later signature.
    Causal is aligned to the bottom right when a segment has more keys than queries, as in flash-attn's kernels."""

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, gqa, scale):
        outs = []
        for a, b, ka, kb in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
            mask = torch.ones(b - a, kb - ka, dtype=torch.bool).tril(kb - ka - (b - a)) if causal else None
            o = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None],
                k[ka:kb].transpose(0, 1)[None],
                v[ka:kb].transpose(0, 1)[None],
                attn_mask=mask,
                enable_gqa=gqa,
                scale=scale,
            )
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    if new_api:

        def varlen_attn(
            q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False
        ):
            return run(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), enable_gqa, scale)
    else:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            assert q.shape[1] == k.shape[1], "the 2.10 kernel has no GQA: key/value heads must be repeated"
            return run(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, False, None)

    return varlen_attn


_GRADIENT_BYTES = """
import hashlib, sys, torch
from fastsoft.frozen.loading import load_model
from fastsoft.train.objectives import job_loss_sums
from fastsoft.frozen.packing import Segment, pack, pack_shared, scored_hidden, sharable_prefix, sigma_leads
tiny = load_model(sys.argv[1])
torch.manual_seed(0)
prompts = torch.randn(2, 16, 64, requires_grad=True)  # 64 segments share slot 0: σ's rows gathered 64 times each
segments = [Segment(i % 2, [5, 6 + i % 7], [7, 8, 9 + i % 5] * (1 + i % 3), [10, 11]) for i in range(64)]
hidden = scored_hidden(tiny, prompts, pack(segments, 16))
(hidden * torch.randn_like(hidden)).sum().backward()
print(hashlib.sha256(prompts.grad.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_losses_and_gradients_equal_separate_runs(tiny, attention, monkeypatch):
    """Per-job losses and per-slot gradients of one packed step equal those of each segment run alone, and
    no gradient reaches a slot from another job's segments."""
    attention = _attention(attention, monkeypatch)
    torch.manual_seed(0)
    prompts = torch.randn(4, 3, 64, requires_grad=True)
    segs = [
        Segment(0, [5, 6], [7, 8, 9], [10, 11]),
        Segment(2, [5], [12, 13, 14, 15, 16], [14, 15, 16]),
        Segment(0, [5], [9], [8, 3]),
        Segment(3, [], [40, 41], [42]),
    ]
    job_of_row = torch.tensor([j for j, s in zip([0, 1, 0, 2], segs) for _ in s.answer])
    teacher = torch.log_softmax(torch.randn(len(job_of_row), tiny.vocab_size) * 3, -1)

    def job_losses(hidden, rows):
        per_row = softmax_kl(hidden, tiny.lm_weight, teacher[rows], reduction="none", backend="reference")
        return torch.zeros(3).index_add(0, job_of_row[rows], per_row)

    packed = job_losses(scored_hidden(tiny, prompts, pack(segs, 3), attention), torch.arange(len(job_of_row)))
    rows, alone = 0, torch.zeros(3)
    for seg in segs:
        n = len(seg.answer)
        alone = alone + job_losses(
            scored_hidden(tiny, prompts, pack([seg], 3), attention), torch.arange(rows, rows + n)
        )
        rows += n
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    for job, slot in enumerate([0, 2, 3]):
        (g_packed,) = torch.autograd.grad(packed[job], prompts, retain_graph=True)
        (g_alone,) = torch.autograd.grad(alone[job], prompts, retain_graph=True)
        torch.testing.assert_close(g_packed, g_alone, rtol=1e-4, atol=1e-6)
        assert g_packed[slot].abs().sum() > 0
        others = [s for s in range(4) if s != slot]
        assert g_packed[others].abs().sum() == 0  # not a single bit from another job's segments (slot 1 is unused)


HEAD = [5, 6, 7, 8, 9]  # the template head every segment starts with


def _prefix_segments():
    return [
        Segment(0, HEAD, [17, 18, 19], [20, 21]),
        Segment(2, HEAD, [22, 23, 24, 25, 26] * 3, [24, 25, 26]),
        Segment(0, HEAD, [19], [28, 23]),
        Segment(None, HEAD, [30, 31], [32]),  # the no-context baseline of evaluation
    ]


@pytest.mark.parametrize("attention", ["fastsoft_buckets", "fastsoft_varlen:new", "fastsoft_varlen:old"])
def test_shared_prefix_gives_the_same_hidden_states_and_gradients(tiny, attention, monkeypatch):
    """Every segment attending to the head's cached keys and values equals running the head in every segment."""
    attention = _attention(attention, monkeypatch)
    torch.manual_seed(0)
    prompts = torch.randn(3, 4, 64, requires_grad=True)
    segs = _prefix_segments()
    assert sharable_prefix(tiny, segs, attention) == tuple(HEAD)
    whole = scored_hidden(tiny, prompts, pack(segs, 4), attention)
    shared = scored_hidden(tiny, prompts, pack(segs, 4, tuple(HEAD)), attention)
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(whole)
    (g_whole,) = torch.autograd.grad((whole * weights).sum(), prompts)
    (g_shared,) = torch.autograd.grad((shared * weights).sum(), prompts)
    torch.testing.assert_close(g_shared, g_whole, rtol=1e-4, atol=1e-6)
    assert g_shared[1].abs().sum() == 0  # slot 1 is in no segment


def test_shared_prefix_gives_the_same_job_losses(tiny):
    torch.manual_seed(1)
    prompts = torch.randn(3, 4, 64, requires_grad=True)
    segs = _prefix_segments()[:3]
    teacher = SparseTarget.one_hot(torch.tensor([t for s in segs for t in s.answer]))
    sums = {
        share: job_loss_sums(tiny, prompts, segs, [0, 1, 0], 2, teacher, {"kl": 1.0}, share_prefix=share)
        for share in (False, True)
    }
    torch.testing.assert_close(sums[True], sums[False], rtol=1e-5, atol=1e-5)
    grads = {share: torch.autograd.grad(sums[share].sum(), prompts)[0] for share in sums}
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6)


def test_what_shares_a_prefix(tiny):
    segs = _prefix_segments()
    assert sharable_prefix(tiny, segs) == tuple(HEAD)  # CPU: sdpa per length bucket takes one
    assert sharable_prefix(tiny, segs, "sdpa") == ()  # transformers' own implementations do not
    assert sharable_prefix(tiny, segs, "eager") == ()
    assert sharable_prefix(tiny, [Segment(0, [], [5, 6], [7])] * 2) == ()  # placement first: nothing before σ
    assert sharable_prefix(tiny, segs + [Segment(0, HEAD[:-1], [5], [7])]) == ()  # heads differ: run them whole
    packed = pack(segs[:2], 4, tuple(HEAD))
    assert packed.position_ids[:3].tolist() == [5, 6, 7] and packed.ids[4:7].tolist() == [17, 18, 19]
    assert packed.cu_seq_lens.tolist() == [0, 8, 8 + 4 + 15 + 2]  # each without its last answer token
    with pytest.raises(ValueError, match="shared prefix"):
        pack([Segment(0, [1, 2], [3], [4])], 4, tuple(HEAD))
    with pytest.raises(ValueError, match="does not take a shared prefix"):
        scored_hidden(tiny, torch.zeros(3, 4, 64), packed, "sdpa")


def _led_segments(head):
    return [
        Segment(0, head, [17, 18, 19], [20, 21]),
        Segment(2, head, [22, 23, 24, 25, 26] * 3, [24, 25, 26]),
        Segment(0, head, [19], [28, 23]),
        Segment(None, head, [30, 31], [32]),  # no σ: never led
        Segment(2, head, [33, 34], [35, 36, 37]),  # slot 2 again, after other segments
        Segment(0, head, [38, 39, 40, 41], [42]),
        Segment(1, head, [43], [44]),  # alone in its slot: nothing to share
    ]


@pytest.mark.parametrize("attention", ["fastsoft_buckets", "fastsoft_varlen:new", "fastsoft_varlen:old"])
@pytest.mark.parametrize("head", [HEAD, []], ids=["with the shared head", "placement first"])
def test_shared_sigma_gives_the_same_hidden_states_and_gradients(tiny, attention, head, monkeypatch):
    """Each job's σ run once as a lead that its segments attend to equals σ run inside every segment: hidden states
    at every scored row and the gradient of every slot."""
    attention = _attention(attention, monkeypatch)
    torch.manual_seed(0)
    prompts = torch.randn(3, 4, 64, requires_grad=True)
    segs = _led_segments(head)
    whole = scored_hidden(tiny, prompts, pack(segs, 4), attention)
    led = pack(segs, 4, tuple(head), share_sigma=True)
    assert led.leads is not None and int((led.leads[:, 1] > 0).sum()) == 5  # slots 0 and 2: five segments led
    shared = scored_hidden(tiny, prompts, led, attention)
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(whole)
    (g_whole,) = torch.autograd.grad((whole * weights).sum(), prompts)
    (g_shared,) = torch.autograd.grad((shared * weights).sum(), prompts)
    torch.testing.assert_close(g_shared, g_whole, rtol=1e-4, atol=1e-6)
    assert g_shared[1].abs().sum() > 0  # slot 1, alone and not led, still gets its gradient


@pytest.mark.parametrize("calls", ["one call", "length buckets"])
@pytest.mark.parametrize("share", [True, False], ids=["head and σ shared", "whole segments"])
def test_bucket_attention_in_one_call_or_per_length_bucket_equals_sdpa(tiny, calls, share, monkeypatch):
    """The bucket attention's two groupings (all runs in one masked sdpa call, or one per length bucket, leads of
    different lengths padded and masked) give transformers' sdpa on the whole segments: hidden states and gradients."""
    monkeypatch.setattr(attention_mod, "CALL_COST_ENTRIES", 10**9 if calls == "one call" else 0)
    torch.manual_seed(0)
    prompts = torch.randn(3, 4, 64, requires_grad=True)
    segs = _led_segments(HEAD)
    whole = scored_hidden(tiny, prompts, pack(segs, 4), "sdpa")
    packed = pack_shared(tiny, segs, 4, "fastsoft_buckets", share)
    buckets = attention_mod.length_buckets(packed.cu_seq_lens, "cpu", packed.leads, len(packed.prefix))
    assert (len(buckets.buckets) == 1) == (calls == "one call")
    bucketed = scored_hidden(tiny, prompts, packed, "fastsoft_buckets")
    torch.testing.assert_close(bucketed, whole, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(whole)
    (g_whole,) = torch.autograd.grad((whole * weights).sum(), prompts)
    (g_bucketed,) = torch.autograd.grad((bucketed * weights).sum(), prompts)
    torch.testing.assert_close(g_bucketed, g_whole, rtol=1e-4, atol=1e-6)


def test_what_shares_sigma(tiny):
    segs = _led_segments(HEAD)
    assert sigma_leads(segs, len(HEAD)) == {0, 2}
    assert sigma_leads(segs + [Segment(0, HEAD, [], [5])], len(HEAD)) == {2}  # one slot-0 segment has nothing after σ
    assert sigma_leads(segs + [Segment(2, HEAD + [9], [5], [6])], len(HEAD)) == {0}  # slot 2's befores differ
    packed = pack(segs[:3], 4, tuple(HEAD), share_sigma=True)
    # slot 0's lead (σ, 4 rows), its first segment's tail, slot 2 whole (alone in its slot), slot 0's second tail
    assert packed.cu_seq_lens.tolist() == [0, 4, 8, 8 + 4 + 15 + 2, 8 + 4 + 15 + 2 + 2]  # no last answer tokens
    assert packed.leads.tolist() == [[0, 0], [0, 4], [0, 0], [0, 4]]
    assert packed.position_ids[:9].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 5]  # the tail continues after σ
    assert packed.sigma_rows[:4].tolist() == [0, 1, 2, 3] and (packed.sigma_rows[4:8] == -1).all()
    assert packed.scored[:2].tolist() == [6, 7]  # the last query token, then the first answer token
    assert pack_shared(tiny, segs, 4).leads is not None
    assert (
        pack_shared(tiny, segs, 4, share=False).leads is None and pack_shared(tiny, segs, 4, share=False).prefix == ()
    )
    assert pack_shared(tiny, segs, 4, "sdpa").leads is None  # transformers' own attention takes no lead
    with pytest.raises(ValueError, match="does not take a shared prefix"):
        scored_hidden(tiny, torch.zeros(3, 4, 64), pack(segs, 4, share_sigma=True), "sdpa")


def test_packed_attention_choice(tiny):
    assert tiny.model.config._attn_implementation == "sdpa"
    assert attention_mod.packed_attention(tiny) == attention_mod.BUCKETS_ATTENTION  # CPU: sdpa per length bucket
    for name, match in (
        (attention_mod.VARLEN_ATTENTION, "cu_seq_lens"),
        (attention_mod.BUCKETS_ATTENTION, "length buckets"),
    ):
        with pytest.raises(RuntimeError, match=match):
            with attention_mod.attention_implementation(tiny, name):
                tiny.hidden_states(input_ids=torch.tensor([[5, 6, 7]]))
        assert tiny.model.config._attn_implementation == "sdpa"  # restored after the error


@pytest.mark.gpu
def test_gpu_packed_attention_matches_sdpa(tiny_model_dir):
    """The varlen backend chosen on CUDA gives sdpa's hidden states and prompt gradients (bf16)."""
    from fastsoft.frozen.loading import load_model

    loaded = load_model(tiny_model_dir, dtype="bf16", device="cuda")
    choice = attention_mod.packed_attention(loaded)
    if choice not in attention_mod.VARLEN_ATTENTIONS:
        pytest.skip(f"no varlen attention in this install (packed steps use {choice})")
    torch.manual_seed(0)
    prompts = torch.randn(3, 4, 64, device="cuda", requires_grad=True)
    segs = [
        Segment(0, [5, 6], [7, 8, 9] * 9, [10, 11]),
        Segment(2, [5], [12, 13], [14, 15, 16]),
        Segment(None, [5], [7], [8]),
    ]
    fast = scored_hidden(loaded, prompts, pack(segs, 4))
    slow = scored_hidden(loaded, prompts, pack(segs, 4), attention="sdpa")
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0.05, atol=0.05)
    (g_fast,) = torch.autograd.grad(fast.float().square().sum(), prompts)
    (g_slow,) = torch.autograd.grad(slow.float().square().sum(), prompts)
    assert g_fast[1].abs().sum() == 0
    assert float((g_fast - g_slow).norm() / g_slow.norm()) < 0.05


@pytest.mark.gpu
def test_gpu_shared_prefix_matches_the_whole_segments(tiny_model_dir):
    """On CUDA (bf16, torch's varlen kernel) the shared prefix gives the hidden states and gradients of whole segments:
    this is the check that the kernel's causal mask is aligned to the bottom right when keys outnumber queries."""
    from fastsoft.frozen.loading import load_model

    loaded = load_model(tiny_model_dir, dtype="bf16", device="cuda")
    choice = attention_mod.packed_attention(loaded)
    if choice not in attention_mod.PREFIX_ATTENTIONS:
        pytest.skip(f"no fastsoft varlen attention in this install (packed steps use {choice})")
    torch.manual_seed(0)
    prompts = torch.randn(3, 4, 64, device="cuda", requires_grad=True)
    segs = _prefix_segments()
    whole = scored_hidden(loaded, prompts, pack(segs, 4))
    shared = scored_hidden(loaded, prompts, pack(segs, 4, tuple(HEAD)))
    torch.testing.assert_close(shared.float(), whole.float(), rtol=0.05, atol=0.05)
    (g_whole,) = torch.autograd.grad(whole.float().square().sum(), prompts)
    (g_shared,) = torch.autograd.grad(shared.float().square().sum(), prompts)
    assert float((g_shared - g_whole).norm() / g_whole.norm()) < 0.05


def test_student_gradient_is_bit_identical_across_processes(tiny_model_dir):
    """No op in the packed step accumulates in thread-dependent order (CPU advanced-indexing backward adds
    with atomics, so a seeded run once drifted from 1e-7 at step 2 to 0.015 of gap_closed at step 200)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    digests = {
        subprocess.run(
            [sys.executable, "-c", _GRADIENT_BYTES, str(tiny_model_dir)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(digests) == 1, digests


def test_packed_rows_need_use_cache_false(tiny):
    """Regression: with transformers' default cache, packed segments attend to each other."""
    a, b = torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 6))
    alone = tiny.model(b).logits
    ids = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    leaky = tiny.model(input_ids=ids, position_ids=positions).logits[:, 9:]
    assert (leaky - alone).abs().max() > 1e-3  # the hazard is real in this transformers version
    sealed = tiny.lm_weight @ tiny.hidden_states(input_ids=ids, position_ids=positions)[0, 9:].T
    torch.testing.assert_close(sealed.T, alone[0], rtol=1e-4, atol=1e-5)
