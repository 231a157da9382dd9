"""The backward's gradient filter (``grad_filter``), reference and C++ backends: the bound, the recompute, the errors.

The Triton backend's filter is tested under the interpreter in ``test_grad_filter_triton.py``; the filter on the real
model's own distributions is in ``tests/e2e/test_real_model.py``.
"""

from __future__ import annotations

import pytest
import torch

from fastsoft.ops import CompactTarget, DenseTarget, filtered_rows, reference, softmax_kl
from fastsoft.ops.softmax_kl import FILTER_RHO, resolve_backend

BACKENDS = ["reference", "cpp"]


def _peaked(n=6, h=16, v=4096, scale=6.0, seed=0, dtype=torch.float64):
    """Random but peaked student and teacher distributions (large logits), the filter's good case."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    hidden = scale * torch.randn(n, h, generator=g, dtype=dtype)
    teacher = CompactTarget.from_hidden(hidden + 0.3 * torch.randn(n, h, generator=g, dtype=dtype), weight, 1.0)
    return hidden, weight, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_dropped_bounds_what_was_left_out(backend, temperature):
    hidden, weight, teacher = _peaked()
    teacher = CompactTarget.from_hidden(hidden * 1.05, weight, temperature)
    _, rows = resolve_backend(backend, hidden.device)
    loss0, exact = reference.softmax_kl_rows(hidden, weight, teacher, temperature, None, True)
    wnorm = weight.float().norm(dim=1)
    for scale in (1e-12, 1e-6, 1e-3):
        loss, grad, dropped, skipped = rows(
            hidden, weight, teacher, temperature, None, True, grad_filter=(wnorm, scale)
        )
        torch.testing.assert_close(loss, loss0, rtol=1e-12, atol=1e-12)  # the loss is never filtered
        err = (grad - exact).norm(dim=1)
        assert (err <= dropped * (1 + 1e-6) + 1e-12).all(), (err, dropped)
    assert float(skipped) > 0.5  # peaked rows: most tiles skipped at the largest scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_skipped_leaves_the_teacher_part(backend):
    hidden, weight, teacher = _peaked(n=3, v=700)
    _, rows = resolve_backend(backend, hidden.device)
    wnorm = weight.float().norm(dim=1)
    _, grad, dropped, skipped = rows(hidden, weight, teacher, 1.0, None, True, grad_filter=(wnorm, 1e30))
    torch.testing.assert_close(grad, -teacher.wbar)
    p = torch.softmax(hidden @ weight.T, -1)
    torch.testing.assert_close(dropped, p @ weight.norm(dim=1), rtol=1e-5, atol=0)
    assert float(skipped) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_row_within_eps_of_exact(backend, dtype):
    hidden, weight, teacher = _peaked(n=8, v=32768, scale=8.0)
    hidden[5] = hidden[4]  # rows whose gradient is ~0 (student == teacher) must be recomputed, not filtered
    teacher = CompactTarget(teacher.wbar.clone(), teacher.neg_entropy.clone(), 1.0)
    exact_t = CompactTarget.from_hidden(hidden[4:5], weight, 1.0)
    teacher.wbar[4:6], teacher.neg_entropy[4:6] = exact_t.wbar, exact_t.neg_entropy
    _, exact = reference.softmax_kl_rows(hidden, weight, teacher, 1.0, None, True)
    _, rows = resolve_backend(backend, hidden.device)
    eps = 1e-3
    h, w = hidden.to(dtype), weight.to(dtype)
    t = CompactTarget(teacher.wbar.to(dtype), teacher.neg_entropy.to(dtype), 1.0)
    _, grad, report = filtered_rows(rows, h, w, t, 1.0, None, eps)
    # the filter's bound is relative; rounding (rows whose exact gradient is ~0) is not the filter's
    rounding = (1e-12 if dtype == torch.float64 else 1e-4) * exact.norm(dim=1).max()
    err = (grad.double() - exact).norm(dim=1)
    assert (err <= eps * exact.norm(dim=1) + rounding).all()
    assert report.bound <= eps and 0 < report.skipped <= 1
    assert report.recomputed >= 2  # rows 4 and 5 lost more than eps of their ~0 gradient and were recomputed


def test_token_weights_and_autograd():
    hidden, weight, teacher = _peaked(n=12)
    weight_t = torch.ones(12, dtype=torch.float64)
    weight_t[[2, 7]] = 0
    teacher.wbar[2] = float("nan")  # an ignored row's target is never read
    h = hidden.clone().requires_grad_()
    softmax_kl(h, weight, teacher, token_weight=weight_t, grad_filter=1e-3, backend="cpp").backward()
    h0 = hidden.clone().requires_grad_()
    softmax_kl(h0, weight, teacher, token_weight=weight_t, backend="reference").backward()
    err = (h.grad - h0.grad).norm(dim=1)
    assert (err <= 1e-3 * h0.grad.norm(dim=1) + 1e-12).all()
    assert (h.grad[[2, 7]] == 0).all()


def test_real_scale_threshold_constant_is_documented():
    # the tile threshold per column is eps * FILTER_RHO * max ||W_v|| / V: FILTER_RHO is a modelling choice, not a bound
    assert 0 < FILTER_RHO < 1


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "1e-3"])
def test_bad_eps_is_refused(bad):
    hidden, weight, teacher = _peaked(n=2, v=300)
    with pytest.raises(ValueError, match="grad_filter"):
        softmax_kl(hidden, weight, teacher, grad_filter=bad)


def test_filter_needs_the_compact_teacher():
    hidden, weight, _ = _peaked(n=2, v=300)
    dense = DenseTarget(torch.log_softmax(hidden @ weight.T, -1))
    with pytest.raises(ValueError, match="CompactTarget"):
        softmax_kl(hidden, weight, dense, grad_filter=1e-3)
    with pytest.raises(ValueError, match="grad_filter needs"):
        reference.softmax_kl_rows(hidden, weight, dense, 1.0, None, True, grad_filter=(weight.norm(dim=1), 1.0))
