"""The frozen model's norms, gated MLP activations, rotary embeddings and projections run as fused ops in a student
step, the teacher pass and greedy generation.

:func:`fused_layers` swaps them, inside its block only, for :mod:`fastsoft.ops.layers`' (one pass forward and one
backward each, in the C++ CPU backend; the projections through oneDNN's packed GEMM) on the Llama-family models whose
formulas those ops implement (``FUSED_FAMILIES``: their ``*RMSNorm``, ``*MLP`` with a SiLU gate and no biases,
``apply_rotary_pos_emb``, and the ``nn.Linear`` projections of their attention and MLP); other models, other devices
and dtypes run unchanged (each fused op falls back to the transformers formula where it does not apply). The same
maths up to rounding; ``FASTSOFT_FUSED_LAYERS=0`` turns it all off, ``FASTSOFT_PACKED_LINEARS=0`` the projections
only (they keep packed copies of their weights, twice their size with gradients: :func:`fastsoft.ops.layers.frozen_linear`).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from fastsoft.ops.layers import frozen_linear, rms_norm, rope, swiglu

FUSED_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")  # RMSNorm, SwiGLU MLP and rotary exactly as Llama's


def _family(module: torch.nn.Module, kind: str) -> bool:
    return type(module).__name__ in {family + kind for family in FUSED_FAMILIES}


def _norm_forward(norm):
    return lambda hidden_states: rms_norm(hidden_states, norm.weight, norm.variance_epsilon)


def _mlp_forward(mlp):
    return lambda x: mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def _linear_forward(linear):
    return lambda x: frozen_linear(x, linear.weight, linear.bias)


def _fusable_mlp(mlp) -> bool:
    linears = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    silu = type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")  # torch's, transformers'
    return silu and all(isinstance(lin, torch.nn.Linear) and lin.bias is None for lin in linears)


@contextlib.contextmanager
def fused_layers(loaded):
    """Run ``loaded``'s model with fused norms, SwiGLU, rotary embeddings and projections inside the block (see the
    module)."""
    if os.environ.get("FASTSOFT_FUSED_LAYERS") == "0":
        yield
        return
    patched: list[tuple[object, str, object]] = []  # (owner, attribute, previous value or None for an instance attr)
    try:
        for module in loaded.model.modules():
            if "forward" in module.__dict__:  # already swapped (a nested block) or the user's own
                continue
            if _family(module, "Attention") or _family(module, "MLP"):
                for linear in module.children():
                    if type(linear) is torch.nn.Linear and "forward" not in linear.__dict__:
                        linear.forward = _linear_forward(linear)
                        patched.append((linear, "forward", None))
            if _family(module, "RMSNorm") and hasattr(module, "variance_epsilon"):
                module.forward = _norm_forward(module)
                patched.append((module, "forward", None))
            elif _family(module, "MLP") and _fusable_mlp(module):
                module.forward = _mlp_forward(module)
                patched.append((module, "forward", None))
            elif _family(module, "Attention"):
                modeling = sys.modules[type(module).__module__]
                previous = getattr(modeling, "apply_rotary_pos_emb", None)
                if previous is not None and previous is not rope:  # once a modeling module, once a block
                    modeling.apply_rotary_pos_emb = rope
                    patched.append((modeling, "apply_rotary_pos_emb", previous))
        yield
    finally:
        for owner, name, previous in reversed(patched):
            if previous is None:
                del owner.__dict__[name]  # the class's own forward again
            else:
                setattr(owner, name, previous)
