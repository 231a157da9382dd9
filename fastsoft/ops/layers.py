"""The frozen decoder layer's small ops, fused: ``rms_norm``, ``swiglu`` and ``rope``, forward and backward.

Each is one pass over its rows each way in the C++ CPU backend (``csrc/layers.cpp``, ``torch.ops.fastsoft.*``, with
their backward in C++ too), where the transformers formulas they replace are 4 to 10 ATen elementwise ops each (at the
student step's sizes, a packed row of ~160 tokens, most of their time is per-op overhead). Only the activations get gradients: the weights,
``cos`` and ``sin`` are frozen (:func:`fused_applies` checks). The ``*_reference`` functions are the transformers
formulas (Llama family), the tests' ground truth and the fallback.

Memory: each saves for its backward what the unfused ops would, or less (``swiglu`` keeps ``gate`` and ``up``, not
``silu(gate)`` too; ``rms_norm`` keeps ``x`` and one number a row).
"""

from __future__ import annotations

import torch

from fastsoft.ops import cpp


def fused_applies(*tensors: torch.Tensor, frozen: tuple[torch.Tensor, ...] = ()) -> bool:
    """Whether the fused ops run on these tensors: fp32/fp64 CPU tensors, ``frozen`` ones needing no gradient, and the
    C++ backend available (else the callers use the reference formulas)."""
    return (
        all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors + frozen)
        and not any(t.requires_grad for t in frozen)
        and cpp.is_available()[0]
    )


# -- rms_norm -----------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm``: ``weight * (x * rsqrt(mean(x^2) + eps))`` over the last dim, in fp32."""
    dtype = x.dtype
    x = x.to(torch.float32) if dtype != torch.float64 else x
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., H]``, frozen ``weight [H]`` -> ``[..., H]``: :func:`rms_norm_reference`, fused where it applies."""
    if not fused_applies(x, frozen=(weight,)) or x.dtype != weight.dtype:
        return rms_norm_reference(x, weight, eps)
    return torch.ops.fastsoft.rms_norm(x, weight, float(eps))


# -- swiglu -------------------------------------------------------------------------------------


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the gated MLP's activation (Llama family: ``act_fn(gate_proj(x)) * up_proj(x)``)."""
    return torch.nn.functional.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate, up [..., I]`` (the same shape and dtype) -> ``silu(gate) * up``, fused where it applies."""
    if not fused_applies(gate, up) or gate.dtype != up.dtype or gate.shape != up.shape:
        return swiglu_reference(gate, up)
    return torch.ops.fastsoft.swiglu(gate, up)


# -- rope ---------------------------------------------------------------------------------------


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` for ``q`` and ``k``."""

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotary embedding of ``q [B, H, L, D]`` and ``k [B, KV, L, D]`` with frozen ``cos``/``sin [B, L, D]``
    (:func:`rope_reference`), fused where it applies; the outputs keep the ``[B, L, heads, D]`` memory layout."""
    if (
        unsqueeze_dim != 1
        or not fused_applies(q, k, frozen=(cos, sin))
        or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1
        or cos.dim() != 3
        or cos.shape != sin.shape
        or cos.shape[0] != q.shape[0]
        or cos.shape[1] != q.shape[2]
    ):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    return tuple(torch.ops.fastsoft.rope(q, k, cos, sin))
