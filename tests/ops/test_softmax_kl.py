"""softmax_kl: the public op and its pure-PyTorch reference against an fp64 naive computation.

Backend-specific suites: tests/ops/test_softmax_kl_cpp.py (C++), tests/ops/test_softmax_kl_triton.py (Triton).
Error bound (as flash-attn and cut-cross-entropy test): at most 2x the same-dtype naive PyTorch error, plus a small atol.
"""

from __future__ import annotations

import math

import pytest
import torch
from softmax_kl_cases import KINDS, make_teacher, stable_seed
from softmax_kl_cases import cast_teacher as cast

from fastsoft.ops import BackendUnavailable, HiddenTarget, SoftmaxKLLoss, SparseTarget, reference, softmax_kl
from fastsoft.ops.reference import softmax_kl_naive


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_matches_naive_fp64(kind, temperature, reduction, weighted):
    gen = torch.Generator().manual_seed(stable_seed(kind, temperature, reduction, weighted))
    n, v, hd = 9, 1271, 123
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd)
    teacher = make_teacher(kind, n, v, hd, gen, lm_weight=W, temperature=temperature)
    tw = torch.rand(n, generator=gen, dtype=torch.float64) if weighted else None
    if weighted:
        tw[3] = 0
    grad_out = torch.randn(n if reduction == "none" else (), generator=gen, dtype=torch.float64)

    out = softmax_kl(h, W, teacher, temperature=temperature, token_weight=tw, reduction=reduction, backend="reference")
    (out * grad_out).sum().backward()
    got_value, got_grad = out.detach(), h.grad.clone()

    h.grad = None
    rows = softmax_kl_naive(h, W, teacher, temperature) * (tw if weighted else 1)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / (tw.sum() if weighted else n)}[reduction]
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got_value, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, h.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_fp32_error_within_twice_naive(kind):
    """fp32 reference vs fp64 truth, against the same-dtype naive torch error, at V > 64k and H = 576."""
    gen = torch.Generator().manual_seed(1)
    n, v, hd = 6, 66_001, 576
    h64 = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W64 = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd) * 4
    t64 = make_teacher(kind, n, v, hd, gen, lm_weight=W64)
    truth = softmax_kl_naive(h64, W64, t64, 1.0)
    naive32 = softmax_kl_naive(h64.float(), W64.float(), cast(t64, torch.float32), 1.0).double()
    ours = softmax_kl(
        h64.float(), W64.float(), cast(t64, torch.float32), reduction="none", backend="reference"
    ).double()
    assert (ours - truth).abs().max() <= 2 * (naive32 - truth).abs().max() + 1e-5


def test_huge_logits_and_one_hot_teacher_stay_finite():
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(4, 32, generator=gen) * 1e3).requires_grad_()
    W = torch.randn(300, 32, generator=gen) * 10  # logits around +-1e4 and beyond
    one_hot = torch.full((4, 300), float("-inf"))
    one_hot[:, 7] = 0.0  # exact zeros in the teacher
    for teacher in (
        one_hot,
        SparseTarget.one_hot(torch.full((4,), 7)),
        HiddenTarget(torch.randn(4, 32, generator=gen) * 1e3),
    ):
        loss = softmax_kl(h, W, teacher, backend="reference")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
        h.grad = None


def test_ignored_rows_give_zero_and_never_leak_nan():
    h = torch.randn(3, 8, requires_grad=True)
    W = torch.randn(50, 8)
    teacher = torch.log_softmax(torch.randn(3, 50), -1)
    teacher[1] = float("nan")
    tw = torch.tensor([1.0, 0.0, 2.0])
    loss = softmax_kl(h, W, teacher, token_weight=tw, backend="reference")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert h.grad[1].abs().max() == 0
    all_ignored = softmax_kl(h, W, teacher, token_weight=torch.zeros(3), backend="reference")
    assert all_ignored.item() == 0.0


def test_no_gradient_for_lm_weight_even_if_it_requires_grad():
    h = torch.randn(4, 8, requires_grad=True)
    W = torch.randn(40, 8, requires_grad=True)
    softmax_kl(h, W, torch.log_softmax(torch.randn(4, 40), -1), backend="reference").backward()
    assert W.grad is None and h.grad is not None


def test_empty_batch():
    h = torch.zeros(0, 8, requires_grad=True)
    out = softmax_kl(h, torch.randn(40, 8), torch.zeros(0, 40), backend="reference")
    out.backward()
    assert out.item() == 0.0 and h.grad.shape == (0, 8)


def test_bad_arguments_raise_clear_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, W = torch.randn(4, 8), torch.randn(40, 8)
    with pytest.raises(ValueError, match="shape"):
        softmax_kl(h, W, torch.zeros(4, 41))
    with pytest.raises(ValueError, match="temperature"):
        softmax_kl(h, W, torch.zeros(4, 40), temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        softmax_kl(h, W, torch.zeros(4, 40), reduction="avg")
    with pytest.raises(ValueError, match="unknown softmax_kl backend"):
        softmax_kl(h, W, torch.zeros(4, 40), backend="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        softmax_kl(h, W, torch.zeros(4, 40), backend="triton")


def test_module_form_matches_function():
    h, W = torch.randn(5, 8), torch.randn(40, 8)
    t = torch.log_softmax(torch.randn(5, 40), -1)
    module = SoftmaxKLLoss(temperature=2.0, backend="reference")
    assert torch.equal(module(h, W, t), softmax_kl(h, W, t, temperature=2.0, backend="reference"))


def test_reference_keeps_only_a_chunk_of_logits(monkeypatch):
    """The reference never forms [N, V]: every matmul output it creates has at most CHUNK rows."""
    n, v, hd = 64, 1000, 16
    monkeypatch.setattr(reference, "CHUNK_BYTES", 8 * v * 4)  # 8 rows of fp32 logits a chunk
    shapes = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(
        torch.Tensor, "__matmul__", lambda a, b: shapes.append(tuple(real_matmul(a, b).shape)) or real_matmul(a, b)
    )
    reference.softmax_kl_rows(torch.randn(n, hd), torch.randn(v, hd), torch.zeros(n, v), 1.0, None, True)
    assert shapes and max(s[0] for s in shapes) <= 8


@pytest.mark.parametrize("temperature", [0.05, 0.3, 5.0, 20.0])
@pytest.mark.parametrize("kind", ["dense", "topk", "onehot", "compact", "compact-dense"])
def test_extreme_temperatures_stay_finite_and_exact(kind, temperature):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    teacher = make_teacher(kind, 5, 200, 16, gen, sharp=8.0, lm_weight=W, temperature=temperature)
    loss = softmax_kl(h, W, teacher, temperature=temperature, backend="reference", reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    want = softmax_kl_naive(h.detach(), W, teacher, temperature).sum()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-9, atol=1e-9)
