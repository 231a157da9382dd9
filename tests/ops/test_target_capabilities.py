"""What a target type can do is its class attributes (``DIVERGENCES``, ``GRAD_FILTER``), and every check reads them:
``softmax_kl`` and each CPU backend accept exactly the divergences and the gradient filter a teacher kind's target
type declares, and refuse the others with a ValueError. (The Triton backend's host checks call the same
``check_divergence`` / ``check_grad_filter``; tests/ops/test_grad_filter_triton.py runs them under the interpreter.)
"""

from __future__ import annotations

import pytest
import torch

from fastsoft.ops import TARGET_TYPES, cpp, reference, softmax_kl
from fastsoft.ops.targets import DIVERGENCES
from fastsoft.teacher.targets import KINDS, CacheSpec

ROWS = {"reference": reference.softmax_kl_rows}
if cpp.is_available()[0]:
    ROWS["cpp"] = cpp.softmax_kl_rows


def _case(kind: str):
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(3, 8, generator=gen), torch.randn(50, 8, generator=gen)
    target = CacheSpec(kind, top_k=4, samples=4).build(weight, torch.randn(3, 8, generator=gen), gen)
    return hidden, weight, target


def test_every_target_type_declares_its_capabilities():
    for t in TARGET_TYPES:
        assert t.DIVERGENCES <= set(DIVERGENCES) and "forward" in t.DIVERGENCES
        assert t.GRAD_FILTER <= t.DIVERGENCES and isinstance(t.VOCAB_ROWS, bool)
    assert {kind.target_type for kind in KINDS.values()} == set(TARGET_TYPES)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_accepted_exactly_as_declared(kind, divergence):
    hidden, weight, target = _case(kind)
    served = divergence in type(target).DIVERGENCES
    for name, rows in ROWS.items():
        if served:
            loss, grad = rows(hidden, weight, target, 1.0, None, True, divergence=divergence)
            assert torch.isfinite(loss).all(), name
        else:
            with pytest.raises(ValueError, match="not linear in the teacher"):
                rows(hidden, weight, target, 1.0, None, True, divergence=divergence)
    if served:
        softmax_kl(hidden.requires_grad_(), weight, target, divergence=divergence).backward()
    else:
        serving = [t.__name__ for t in TARGET_TYPES if divergence in t.DIVERGENCES]
        with pytest.raises(ValueError, match=f"needs a {' or '.join(serving)}, got {type(target).__name__}"):
            softmax_kl(hidden, weight, target, divergence=divergence)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_grad_filter_accepted_exactly_as_declared(kind, divergence):
    hidden, weight, target = _case(kind)
    if divergence not in type(target).DIVERGENCES:
        return  # refused for the divergence already (above)
    filtered = divergence in type(target).GRAD_FILTER
    for name, rows in ROWS.items():
        call = lambda: rows(  # noqa: E731
            hidden, weight, target, 1.0, None, True, divergence=divergence, grad_filter=(weight.norm(dim=1), 1e-6)
        )
        if filtered:
            assert len(call()) == 4, name
        else:
            with pytest.raises(ValueError, match="grad_filter needs a CompactTarget teacher"):
                call()
    if filtered:
        softmax_kl(hidden.requires_grad_(), weight, target, divergence=divergence, grad_filter=1e-3).backward()
    else:
        with pytest.raises(ValueError, match="grad_filter needs"):
            softmax_kl(hidden.requires_grad_(), weight, target, divergence=divergence, grad_filter=1e-3)
