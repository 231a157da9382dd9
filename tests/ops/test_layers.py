"""The decoder layer's fused ops (csrc/layers.cpp, fastsoft/ops/layers.py) against the transformers formulas, and
``fastsoft.frozen.layers.fused_layers`` on a model: the same hidden states and σ gradients, the model restored after."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from transformers.models.llama import modeling_llama

import fastsoft.ops.layers as layer_ops
from fastsoft.frozen.layers import fused_layers
from fastsoft.frozen.packing import Segment, pack_shared, scored_hidden
from fastsoft.ops import cpp
from fastsoft.ops.layers import (
    frozen_linear,
    frozen_linear_reference,
    fused_applies,
    packed_linears_available,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)


@pytest.fixture(autouse=True)
def cpp_backend():
    ok, why = cpp.is_available()
    if not ok:
        if os.environ.get("FASTSOFT_SKIP_EXT") == "1":
            pytest.skip(why)
        pytest.fail(f"the C++ backend should build here: {why}")


def _rope_inputs(dtype, batch=2, length=7, heads=9, kv=3, dim=16):
    gen = torch.Generator().manual_seed(0)
    # the projections' layout: [B, L, heads, D] memory seen as [B, heads, L, D]
    q = torch.randn(batch, length, heads, dim, generator=gen, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, length, kv, dim, generator=gen, dtype=dtype).transpose(1, 2)
    angle = torch.randn(batch, length, dim // 2, generator=gen, dtype=dtype).repeat(1, 1, 2)
    return q.requires_grad_(), k.requires_grad_(), angle.cos(), angle.sin()


def test_rms_norm_equals_the_transformers_formula_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 576, generator=gen) * 4
    weight = torch.randn(576, generator=gen)
    assert fused_applies(x, frozen=(weight,))  # the C++ op runs here, not the reference it is compared with
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5), rtol=1e-6, atol=1e-6)
    x64 = x[0, :3, :40].double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: rms_norm(t, weight[:40].double(), 1e-5), (x64,))
    # the first layer's norm sees the embeddings; an all-zero row (padding) stays finite
    assert torch.isfinite(rms_norm(torch.zeros(2, 576), weight, 1e-5)).all()


def test_swiglu_equals_silu_times_up_and_its_gradient():
    gen = torch.Generator().manual_seed(1)
    gate, up = torch.randn(4, 1536, generator=gen) * 6, torch.randn(4, 1536, generator=gen)
    gate[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])  # exp's clamps
    assert fused_applies(gate, up)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=1e-6, atol=1e-6)
    g64, u64 = (t[:2, :30].double().requires_grad_() for t in (gate, up))
    assert torch.autograd.gradcheck(swiglu, (g64, u64))


def test_rope_equals_apply_rotary_pos_emb_keeps_its_layout_and_gradient():
    q, k, cos, sin = _rope_inputs(torch.float32)
    assert fused_applies(q, k, frozen=(cos, sin))
    fused, reference = rope(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert a.stride() == b.stride()  # [B, L, heads, D] memory, as the projections wrote it
    q, k, cos, sin = _rope_inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, cos, sin), (q, k))
    (dq,) = torch.autograd.grad(rope(q, k, cos, sin)[0].sum(), q)  # a gradient for q alone
    (dq_ref,) = torch.autograd.grad(rope_reference(q, k, cos, sin)[0].sum(), q)
    torch.testing.assert_close(dq, dq_ref)


def test_frozen_linear_equals_linear_and_its_input_gradient(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(192, 576, generator=gen) / 24, torch.randn(192, generator=gen)
    x = torch.randn(1, 37, 576, generator=gen).requires_grad_()  # a packed row: [1, L, H]
    grad = torch.randn(1, 37, 192, generator=gen)
    assert packed_linears_available()  # oneDNN's packed GEMM runs here, not the reference it is compared with
    for b in (None, bias):
        out = frozen_linear(x, weight, b)
        (gx,) = torch.autograd.grad(out, x, grad)
        want = frozen_linear_reference(x, weight, b)
        (gx_want,) = torch.autograd.grad(want, x, grad)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_want, rtol=1e-5, atol=1e-5)
    packed = layer_ops._PACKS.get(weight, True)
    frozen_linear(x, weight)
    assert layer_ops._PACKS.get(weight, True)[0] is packed[0]  # packed once a weight
    with torch.no_grad():
        weight.mul_(2)  # changed in place: packed again, not stale
    torch.testing.assert_close(frozen_linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)
    weight.data = torch.randn(192, 576, generator=gen) / 24  # replaced without a version bump (what Module.to does)
    torch.testing.assert_close(frozen_linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)
    assert id(weight) in layer_ops._PACKS.table and not hasattr(weight, "_fastsoft_packed")  # beside it, not on it
    key = id(weight)
    del weight, packed
    gc.collect()
    assert key not in layer_ops._PACKS.table  # freed with the weight
    # a transposed input (not contiguous) and no autograd (the teacher pass)
    with torch.no_grad():
        xt, w = torch.randn(576, 5, generator=gen).T, torch.randn(192, 576, generator=gen)
        torch.testing.assert_close(frozen_linear(xt, w, bias), xt @ w.T + bias, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FASTSOFT_PACKED_LINEARS", "0")  # the switch: torch's own linear, bit for bit
    assert not packed_linears_available()
    assert torch.equal(frozen_linear(x, w, bias), frozen_linear_reference(x, w, bias))


def test_frozen_linear_packs_within_its_memory_budget(monkeypatch):
    """Past the budget a weight runs unpacked, bit for bit torch's linear, with one warning; a weight within it is
    still packed (W only while no gradient is wanted, Wᵀ too once one is, else unpacked); a replaced or freed
    weight's copies leave the budget."""
    gen = torch.Generator().manual_seed(3)
    small, large = torch.randn(8, 16, generator=gen), torch.randn(64, 64, generator=gen)
    x = torch.randn(5, 16, generator=gen)
    packs = layer_ops._PackedWeights(budget=small.nbytes + 64 * 16 * 4 + 1000)  # room for small and one [64, 16]
    monkeypatch.setattr(layer_ops, "_PACKS", packs)
    frozen_linear(x, small)  # no gradient wanted: W packed, not Wᵀ
    assert packs.table[id(small)][3] is None and packs.bytes == small.nbytes
    with pytest.warns(UserWarning, match="budget"):
        out = frozen_linear(torch.randn(5, 64, generator=gen), large)
    assert id(large) not in packs.table
    xl = torch.randn(5, 64, generator=gen)
    assert torch.equal(frozen_linear(xl, large), frozen_linear_reference(xl, large)) and out.shape == (5, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        frozen_linear(xl, large)
        fits = torch.randn(64, 16, generator=gen)
        torch.testing.assert_close(frozen_linear(x, fits), x @ fits.T, rtol=1e-5, atol=1e-5)
        assert id(fits) in packs.table
        xg = x.clone().requires_grad_()  # a gradient wanted: Wᵀ would pass the budget, so torch's linear runs
        (gx,) = torch.autograd.grad(frozen_linear(xg, fits).sum(), xg)
        torch.testing.assert_close(gx, torch.ones(5, 64) @ fits, rtol=1e-5, atol=1e-5)
        assert packs.table[id(fits)][3] is None
        fresh = torch.randn(64, 16, generator=gen)  # W alone would fit, W and Wᵀ would not: nothing packed
        (gx,) = torch.autograd.grad(frozen_linear(xg, fresh).sum(), xg)
        torch.testing.assert_close(gx, torch.ones(5, 64) @ fresh, rtol=1e-5, atol=1e-5)
        assert id(fresh) not in packs.table
        small.data = torch.randn(8, 16, generator=gen)  # replaced: repacked, the old copy's bytes given back
        torch.testing.assert_close(frozen_linear(x, small), x @ small.T, rtol=1e-5, atol=1e-5)
    assert packs.bytes == small.nbytes + fits.nbytes
    del small, fits
    gc.collect()
    assert packs.table == {} and packs.bytes == 0  # freed weights give their room back
    unlimited = layer_ops._PackedWeights(budget=None)  # no memory figure readable: no budget
    monkeypatch.setattr(layer_ops, "_PACKS", unlimited)
    frozen_linear(xl, large)
    assert id(large) in unlimited.table


def test_the_budget_is_half_the_available_memory_over_the_local_ranks(monkeypatch):
    monkeypatch.setattr(layer_ops, "available_memory", lambda: 4000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks on this machine share it
    packs = layer_ops._PackedWeights()
    assert packs._fits(1000) and packs.budget == 1000
    with pytest.warns(UserWarning, match="budget"):
        assert not packs._fits(1001)


def test_available_memory_reads_meminfo_and_the_cgroup_limits(tmp_path, monkeypatch):
    """The least of MemAvailable and the headroom (limit - usage + inactive file cache) of the process's memory cgroup
    and its parents, v2 and v1; unlimited cgroups ("max", v1's ~2^63) and unreadable files are left out."""
    (tmp_path / "meminfo").write_text("MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n")
    job = tmp_path / "cg" / "slurm" / "job_7"
    job.mkdir(parents=True)
    for folder, limit, usage, inactive in (
        (tmp_path / "cg", "max", "0", 0),
        (job.parent, "6000000000", "1000000000", 0),
        (job, "3000000000", "2500000000", 1000000000),
    ):
        (folder / "memory.max").write_text(limit + "\n")
        (folder / "memory.current").write_text(usage + "\n")
        (folder / "memory.stat").write_text(f"anon 5\ninactive_file {inactive}\n")
    (tmp_path / "cgroup").write_text("0::/slurm/job_7\n")
    monkeypatch.setattr(layer_ops, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(layer_ops, "_PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(layer_ops, "_CGROUP_ROOT", tmp_path / "cg")
    assert layer_ops.available_memory() == 3000000000 - 2500000000 + 1000000000  # the job's, under its parent's
    v1 = tmp_path / "cg" / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("5\n")
    (v1 / "memory.stat").write_text("total_inactive_file 0\n")
    (tmp_path / "cgroup").write_text("9:memory:/\n")
    assert layer_ops.available_memory() == 8000000 * 1024  # MemAvailable: the v1 cgroup sets no limit
    (v1 / "memory.limit_in_bytes").write_text("1000\n")
    assert layer_ops.available_memory() == 995
    monkeypatch.setattr(layer_ops, "_MEMINFO", tmp_path / "missing")
    monkeypatch.setattr(layer_ops, "_PROC_CGROUP", tmp_path / "missing")
    assert layer_ops.available_memory() is None


def test_logits_run_through_frozen_linear_unless_the_fused_layers_are_off(tiny, monkeypatch):
    hidden = torch.randn(3, tiny.hidden_size, generator=torch.Generator().manual_seed(4))
    want = hidden @ tiny.lm_weight.float().T
    torch.testing.assert_close(tiny.logits(hidden), want, rtol=1e-5, atol=1e-5)
    assert id(tiny.lm_weight) in layer_ops._PACKS.table
    monkeypatch.setenv("FASTSOFT_FUSED_LAYERS", "0")
    assert torch.equal(tiny.logits(hidden), want)


def test_where_the_fused_ops_do_not_apply_they_are_the_reference():
    """A weight that needs a gradient, bf16, or cos/sin that need one: the transformers formulas run (and a gradient
    reaches the weight)."""
    x = torch.randn(3, 8)
    weight = torch.randn(8, requires_grad=True)
    assert not fused_applies(x, frozen=(weight,))
    rms_norm(x, weight, 1e-5).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    xb, wb = x.bfloat16(), torch.randn(8).bfloat16()
    torch.testing.assert_close(rms_norm(xb, wb, 1e-5), rms_norm_reference(xb, wb, 1e-5), rtol=0, atol=0)
    q, k, cos, sin = _rope_inputs(torch.float32)
    cos.requires_grad_()
    rope(q, k, cos, sin)[0].sum().backward()
    assert cos.grad is not None
    w = torch.randn(4, 8, requires_grad=True)  # a trained projection, and fp64: torch's own linear
    frozen_linear(x, w).sum().backward()
    assert w.grad is not None and id(w) not in layer_ops._PACKS.table
    x64, w64 = x.double(), torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(frozen_linear(x64, w64), frozen_linear_reference(x64, w64))
    assert id(w64) not in layer_ops._PACKS.table


def _sigma_step(tiny, prompts):
    segments = [Segment(0, [5, 6, 7], [17, 18, 19], [20, 21]), Segment(1, [5, 6, 7], [22, 23] * 4, [24, 25, 26])]
    packed = pack_shared(tiny, segments, prompts.shape[1], "fastsoft_buckets", True)
    return scored_hidden(tiny, prompts, packed, "fastsoft_buckets")


def test_fused_layers_give_the_same_hidden_states_and_gradients_and_restore_the_model(tiny, monkeypatch, calls):
    torch.manual_seed(0)
    prompts = torch.randn(2, 4, 64, requires_grad=True)
    monkeypatch.setenv("FASTSOFT_FUSED_LAYERS", "0")
    plain = _sigma_step(tiny, prompts)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), prompts)
    monkeypatch.setenv("FASTSOFT_FUSED_LAYERS", "1")
    rope_before = modeling_llama.apply_rotary_pos_emb
    with fused_layers(tiny):  # the swap itself: every norm and MLP, and the rotary function
        swapped = [m for m in tiny.model.modules() if "forward" in m.__dict__]
        kinds = {type(m).__name__ for m in swapped}
        assert kinds == {"LlamaRMSNorm", "LlamaMLP", "Linear"}
        # 2 layers: 2 norms, an MLP and its 3 projections, the attention's 4 projections each; the final norm
        assert len(swapped) == 2 * (2 + 1 + 3 + 4) + 1
        assert modeling_llama.apply_rotary_pos_emb.__name__ == "counted"
        with fused_layers(tiny):  # nested: nothing swapped twice, and the outer block still restores
            pass
        assert modeling_llama.apply_rotary_pos_emb.__name__ == "counted"
    assert modeling_llama.apply_rotary_pos_emb is rope_before
    assert not [m for m in tiny.model.modules() if "forward" in m.__dict__]
    calls.clear()
    fused = _sigma_step(tiny, prompts)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), prompts)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
    # the fused step ran them, once per module a forward
    assert calls == {"rms_norm": 5, "swiglu": 2, "rope": 2, "frozen_linear": 14}


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused ops' calls through fastsoft.frozen.layers (what the swapped forwards call)."""
    import fastsoft.frozen.layers as layers

    counts = {}
    for name in ("rms_norm", "swiglu", "rope", "frozen_linear"):
        op = getattr(layers, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(layers, name, counted)
    return counts
