"""The decoder layer's fused ops (csrc/layers.cpp, fastsoft/ops/layers.py) against the transformers formulas, and
``fastsoft.layers.fused_layers`` on a model: the same hidden states and σ gradients, the model restored after."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from transformers.models.llama import modeling_llama

import fastsoft.ops.layers as layer_ops
from fastsoft.layers import fused_layers
from fastsoft.ops import cpp
from fastsoft.ops.layers import (
    _packed,
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
from fastsoft.train.packing import Segment, pack_shared, scored_hidden


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
    packed = _packed(weight)
    frozen_linear(x, weight)
    assert _packed(weight)[0] is packed[0]  # packed once a weight
    with torch.no_grad():
        weight.mul_(2)  # changed in place: packed again, not stale
    torch.testing.assert_close(frozen_linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)
    weight.data = torch.randn(192, 576, generator=gen) / 24  # replaced without a version bump (what Module.to does)
    torch.testing.assert_close(frozen_linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)
    assert id(weight) in layer_ops._PACKED and not hasattr(weight, "_fastsoft_packed")  # beside the weight, not on it
    key = id(weight)
    del weight, packed
    gc.collect()
    assert key not in layer_ops._PACKED  # freed with the weight
    # a transposed input (not contiguous) and no autograd (the teacher pass)
    with torch.no_grad():
        xt, w = torch.randn(576, 5, generator=gen).T, torch.randn(192, 576, generator=gen)
        torch.testing.assert_close(frozen_linear(xt, w, bias), xt @ w.T + bias, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FASTSOFT_PACKED_LINEARS", "0")  # the switch: torch's own linear, bit for bit
    assert not packed_linears_available()
    assert torch.equal(frozen_linear(x, w, bias), frozen_linear_reference(x, w, bias))


def test_frozen_linear_packs_within_its_memory_budget(monkeypatch):
    """Past the budget (half the memory available at the first packing) a weight runs unpacked, bit for bit torch's
    linear, with one warning; a weight within it is still packed (W only while no gradient is wanted); a freed
    weight's copies leave the budget."""
    gen = torch.Generator().manual_seed(3)
    small, large = torch.randn(8, 16, generator=gen), torch.randn(64, 64, generator=gen)
    x = torch.randn(5, 16, generator=gen)
    monkeypatch.setattr(layer_ops, "_PACKED", {})
    monkeypatch.setattr(layer_ops, "_budget", [small.nbytes + 64 * 16 * 4 + 1000])  # room for small and a [64, 16]
    frozen_linear(x, small)  # no gradient wanted: W packed, not Wᵀ
    assert id(small) in layer_ops._PACKED and layer_ops._PACKED[id(small)][3] is None
    with pytest.warns(UserWarning, match="budget"):
        out = frozen_linear(torch.randn(5, 64, generator=gen), large)
    assert id(large) not in layer_ops._PACKED
    xl = torch.randn(5, 64, generator=gen)
    assert torch.equal(frozen_linear(xl, large), frozen_linear_reference(xl, large)) and out.shape == (5, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        frozen_linear(xl, large)
        fits = torch.randn(64, 16, generator=gen)
        torch.testing.assert_close(frozen_linear(x, fits), x @ fits.T, rtol=1e-5, atol=1e-5)
    assert id(fits) in layer_ops._PACKED
    xg = x.clone().requires_grad_()  # a gradient wanted: Wᵀ would pass the budget, so torch's linear runs
    (gx,) = torch.autograd.grad(frozen_linear(xg, fits).sum(), xg)
    torch.testing.assert_close(gx, torch.ones(5, 64) @ fits, rtol=1e-5, atol=1e-5)
    assert layer_ops._PACKED[id(fits)][3] is None
    del small, fits
    gc.collect()
    assert layer_ops._PACKED == {}  # freed weights give their room back


def test_available_memory_is_a_positive_byte_count_here():
    available = layer_ops.available_memory()
    assert available is not None and 0 < available < 2**50


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
    assert w.grad is not None and id(w) not in layer_ops._PACKED
    x64, w64 = x.double(), torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(frozen_linear(x64, w64), frozen_linear_reference(x64, w64))
    assert id(w64) not in layer_ops._PACKED


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
    """Counts the fused ops' calls through fastsoft.layers (what the swapped forwards call)."""
    import fastsoft.layers as layers

    counts = {}
    for name in ("rms_norm", "swiglu", "rope", "frozen_linear"):
        op = getattr(layers, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(layers, name, counted)
    return counts
