"""The frozen decoder layer's ops on CPU: ``rms_norm``, ``swiglu`` and ``rope`` fused, and ``frozen_linear``.

Each is one pass over its rows each way in the C++ CPU backend (``csrc/layers.cpp``, ``torch.ops.fastsoft.*``, with
their backward in C++ too), where the transformers formulas they replace are 4 to 10 ATen elementwise ops each (at the
student step's sizes, a packed row of ~160 tokens, most of their time is per-op overhead). Only the activations get gradients: the weights,
``cos`` and ``sin`` are frozen (:func:`fused_applies` checks). The ``*_reference`` functions are the transformers
formulas (Llama family), the tests' ground truth and the fallback.

Memory: each saves for its backward what the unfused ops would, or less (``swiglu`` keeps ``gate`` and ``up``, not
``silu(gate)`` too; ``rms_norm`` keeps ``x`` and one number a row).

``frozen_linear`` is the projections' ``x Wᵀ + b`` through oneDNN with ``W`` (and, once a gradient is wanted,
``Wᵀ``) packed once into its blocked layout (as torch.compile's CPU freezing packs them), where torch's CPU ``mm``
calls MKL: on this project's AMD CPU, MKL's fp32 GEMMs at a student step's ~180 rows ran slower than oneDNN's packed
ones (``benchmarks/bench_student.py``: 2.05x -> 2.16x PEFT's speed), and the lm_head's at decoding's few rows 2-3.5x
slower (``benchmarks/bench_frozen_linear.py``). The packed copies are kept, per weight, as long as the weight lives:
twice the projections' weights in memory (once where no gradient is taken), within a budget of half the memory
available when the first weight is packed (:func:`available_memory`), shared among the ranks on the machine; weights
past it run unpacked.
"""

from __future__ import annotations

import atexit
import os
import types
import warnings
import weakref
from pathlib import Path

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


# -- frozen_linear ------------------------------------------------------------------------------


def packed_linears_available() -> bool:
    """Whether torch has oneDNN's packed linear here (a CPU build with MKLDNN) and ``FASTSOFT_PACKED_LINEARS`` is not
    ``0``."""
    return (
        os.environ.get("FASTSOFT_PACKED_LINEARS") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


_MEMINFO, _PROC_CGROUP, _CGROUP_ROOT = Path("/proc/meminfo"), Path("/proc/self/cgroup"), Path("/sys/fs/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2^63


def _cgroup_headroom(folder: Path, root: Path, files: tuple[str, str, str]) -> list[int]:
    """``limit - usage + inactive file cache`` (reclaimable) of ``folder`` and of each of its parents up to ``root``,
    where a limit is set; ``files``: the (limit, usage, stat key) names of this cgroup version."""
    found = []
    while True:
        try:
            limit = (folder / files[0]).read_text().strip()
            if limit != "max" and int(limit) < _NO_LIMIT:
                stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
                usage = int((folder / files[1]).read_text()) - int(stat.get(files[2], 0))
                found.append(max(0, int(limit) - usage))
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            return found
        folder = folder.parent


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping: Linux's ``MemAvailable``, lowered to the headroom of
    its memory cgroup (v2 or v1, and their parents: a container's or a job's limit); ``None`` where none is
    readable."""
    found = []
    try:
        found += [
            int(line.split()[1]) * 1024
            for line in _MEMINFO.read_text().splitlines()
            if line.startswith("MemAvailable:")
        ]
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroups = [line.split(":", 2) for line in _PROC_CGROUP.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        cgroups = []
    for hierarchy, controllers, path in cgroups:
        if hierarchy == "0" and not controllers:  # v2, the unified hierarchy
            root, files = _CGROUP_ROOT, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            root, files = (
                _CGROUP_ROOT / "memory",
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
            )
        else:
            continue
        found += _cgroup_headroom(root / path.strip("/"), root, files)
    return min(found) if found else None


class _PackedWeights:
    """The packed copies of frozen weights, beside them (not on them: an attribute would travel with a weight into
    ``torch.save`` and ``deepcopy``), within a memory budget: by default half the memory available at the first
    packing, shared among the ranks on the machine (``LOCAL_WORLD_SIZE``); the rest is the training's (activations,
    the optimizer, the cache)."""

    SHARE = 0.5

    def __init__(self, budget: int | None | types.EllipsisType = ...):
        # id(weight) -> [a weak reference to it, its (_version, data_ptr) when packed, W packed, Wᵀ packed or None
        # until a backward needs it]
        self.table: dict[int, list] = {}
        self.bytes = 0
        self.budget = budget  # ``...``: not measured yet
        self.warned = False

    def clear(self) -> None:
        self.table.clear()
        self.bytes = 0

    def _drop(self, key: int, ref=None) -> None:
        entry = self.table.get(key)
        if entry is not None and (ref is None or entry[0] is ref):  # not a newer entry under a reused id
            del self.table[key]
            self.bytes -= sum(pack.nbytes for pack in entry[2:] if pack is not None)

    def _fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more of packed copies stay within the budget; warns once when they do not."""
        if self.budget is ...:
            available = available_memory()
            ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            self.budget = None if available is None else int(available * self.SHARE / ranks)
        if self.budget is None or self.bytes + nbytes <= self.budget:
            return True
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"fastsoft: the packed copies of the frozen weights reached their budget "
                f"({self.budget / 2**30:.2f} GiB: half the memory available at the first one, over the ranks on this "
                "machine); the others run through torch's linear (FASTSOFT_PACKED_LINEARS=0 packs none)",
                stacklevel=4,  # frozen_linear's caller
            )
        return False

    def get(self, weight: torch.Tensor, backward: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``weight [out, in]`` in oneDNN's blocked layout, and its transpose when ``backward`` (or packed before),
        each packed at first need and again after the weight changed (in place, or its ``.data`` replaced; a change
        made through ``.data`` in place is not seen); dropped when the weight is freed. ``None`` over the budget."""
        key, stamp = id(weight), (weight._version, weight.data_ptr())
        entry = self.table.get(key)
        if entry is None or entry[0]() is not weight or entry[1] != stamp:
            self._drop(key)
            if not self._fits(weight.nbytes * (2 if backward else 1)):
                return None
            with torch.no_grad():
                forward = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            entry = [None, stamp, forward, None]
            entry[0] = weakref.ref(weight, lambda ref, key=key: self._drop(key, ref))
            self.table[key] = entry
            self.bytes += forward.nbytes
        if backward and entry[3] is None:
            if not self._fits(weight.nbytes):
                return None
            with torch.no_grad():
                entry[3] = torch.ops.mkldnn._reorder_linear_weight(weight.detach().t().contiguous(), None)
            self.bytes += entry[3].nbytes
        return entry[2], entry[3]


_PACKS = _PackedWeights()
atexit.register(_PACKS.clear)  # free the oneDNN tensors while torch is whole, not in the interpreter's late teardown


def frozen_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``: what an ``nn.Linear`` computes."""
    return torch.nn.functional.linear(x, weight, bias)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]`` times frozen ``weight [out, in]``ᵀ (+ frozen ``bias [out]``) -> ``[..., out]``.

    Through oneDNN's packed GEMM for fp32 CPU tensors (``torch.ops.fastsoft.frozen_linear``, its backward in C++, when
    ``x`` needs a gradient; else oneDNN's op directly), otherwise :func:`frozen_linear_reference`. Memory: a weight's
    first call packs ``W`` (its size again), its first call with a gradient ``Wᵀ`` too, kept until the weight is freed,
    while all packed copies stay within half the memory available at the first packing (past it, the reference)."""
    frozen = (weight,) if bias is None else (weight, bias)
    if (
        not packed_linears_available()
        or not fused_applies(x, frozen=frozen)
        or any(t.dtype != torch.float32 for t in (x,) + frozen)
        or x.shape[-1] != weight.shape[1]
    ):
        return frozen_linear_reference(x, weight, bias)
    backward = torch.is_grad_enabled() and x.requires_grad
    packed = _PACKS.get(weight, backward)
    if packed is None:  # over the memory budget
        return frozen_linear_reference(x, weight, bias)
    if not backward:
        return torch.ops.mkldnn._linear_pointwise(x, packed[0], bias, "none", [], None)
    return torch.ops.fastsoft.frozen_linear(x, packed[0], packed[1], bias)
