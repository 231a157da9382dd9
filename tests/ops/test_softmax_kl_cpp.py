"""softmax_kl, C++ CPU backend (csrc/softmax_kl.cpp) against the fp64 reference.

Values and gradients for every teacher kind x temperature x token weights x reduction x grad_output,
odd shapes (V not a tile multiple, V > 64k, H = 123 and 576, several tasks a thread), sharp and flat
teachers, logits of +-1e4, NaN in ignored rows, empty and all-ignored batches. Error bound
(as flash-attn and cut-cross-entropy test): at most 2x the error of the same-dtype PyTorch reference against fp64, plus a small atol.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
from softmax_kl_cases import KINDS
from softmax_kl_cases import cast_teacher as cast
from softmax_kl_cases import make_teacher as _make_teacher

from fastsoft.ops import BackendUnavailable, CompactTarget, HiddenTarget, SparseTarget, cpp, reference, softmax_kl


@pytest.fixture(autouse=True)
def cpp_backend(request):
    """Every test needs the extension except the one about its absence; it must build unless turned off."""
    if request.node.originalname == "test_explicit_cpp_backend_raises_when_turned_off":
        return
    ok, why = cpp.is_available()
    if not ok:
        if os.environ.get("FASTSOFT_SKIP_EXT") == "1":
            pytest.skip(why)
        pytest.fail(f"the C++ backend should build here: {why}")


def make_teacher(*args, **kwargs):
    return _make_teacher(*args, ids_dtype=torch.int32, **kwargs)  # int32 ids: the C++ path converts them


def run(backend, h, W, teacher, grad_out=None, **kw):
    """Value and d(sum(value * grad_out))/dh of the public op."""
    h = h.detach().clone().requires_grad_()
    out = softmax_kl(h, W, teacher, backend=backend, **kw)
    (out * (1 if grad_out is None else grad_out.to(out.dtype))).sum().backward()
    return out.detach().double(), h.grad.double()


def assert_within_twice_reference(h64, W64, t64, dtype, atol=1e-6, **kw):
    """cpp in ``dtype`` vs fp64 truth: error at most 2x the reference's error in ``dtype`` (value and gradient)."""
    truth = run("reference", h64, W64, t64, **kw)
    h, W, t = h64.to(dtype), W64.to(dtype), cast(t64, dtype)
    ref = run("reference", h, W, t, **kw)
    ours = run("cpp", h, W, t, **kw)
    for name, want, theirs, got in zip(("value", "gradient"), truth, ref, ours):
        assert torch.isfinite(got).all(), name
        bound = 2 * (theirs - want).abs().max().item() + atol * max(1.0, want.abs().max().item())
        err = (got - want).abs().max().item()
        assert err <= bound, (
            f"{name}: error {err:.3g} > bound {bound:.3g} (reference error {(theirs - want).abs().max().item():.3g})"
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(kind, temperature, weighted, reduction):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, temperature, weighted, reduction)).encode()))
    n, v, hd = 9, 1271, 123  # V is not a multiple of the vocab tile
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd) * 3
    teacher = make_teacher(kind, n, v, hd, gen, lm_weight=W, temperature=temperature)
    tw = None
    if weighted:
        tw = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
        tw[[2, 5]] = 0
    grad_out = torch.randn(n if reduction == "none" else (), generator=gen, dtype=torch.float64)
    kw = dict(temperature=temperature, token_weight=tw, reduction=reduction, grad_out=grad_out)

    want, got = run("reference", h, W, teacher, **kw), run("cpp", h, W, teacher, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)
    assert_within_twice_reference(h, W, teacher, torch.float32, **kw)


@pytest.mark.parametrize("kind", ["dense", "hidden", "topk", "compact"])
@pytest.mark.parametrize("shape", [(601, 1271, 123), (3, 66_001, 64), (40, 300, 576)], ids=["tasks", "V66001", "H576"])
def test_odd_shapes(kind, shape):
    n, v, hd = shape
    gen = torch.Generator().manual_seed(v)
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd) * 4
    teacher = make_teacher(kind, n, v, hd, gen, k=64, lm_weight=W, temperature=0.8)
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)
    assert_within_twice_reference(h, W, teacher, torch.float32, reduction="none", temperature=0.8, grad_out=grad_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs(dtype, kind):
    """bf16/fp16 inputs are upcast per tile; truth is fp64 on the same (rounded) inputs."""
    gen = torch.Generator().manual_seed(3)
    n, v, hd = 33, 777, 64
    h = torch.randn(n, hd, generator=gen).to(dtype).double()
    W = (torch.randn(v, hd, generator=gen) / 4).to(dtype).double()
    teacher = cast(cast(make_teacher(kind, n, v, hd, gen, lm_weight=W, temperature=1.5), dtype), torch.float64)
    tw = torch.ones(n, dtype=torch.float64)
    tw[7] = 0
    assert_within_twice_reference(h, W, teacher, dtype, token_weight=tw, temperature=1.5)


@pytest.mark.parametrize("sharp", [0.0, 40.0], ids=["flat", "near-one-hot"])
@pytest.mark.parametrize("kind", KINDS)
def test_flat_and_sharp_teachers(kind, sharp):
    gen = torch.Generator().manual_seed(4)
    n, v, hd = 12, 1000, 32
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd)
    teacher = make_teacher(kind, n, v, hd, gen, sharp=sharp, lm_weight=W)
    assert_within_twice_reference(h, W, teacher, torch.float32)


@pytest.mark.parametrize("eps", [1e-2, 1e-4])
@pytest.mark.parametrize("kind", ["dense", "hidden"])
def test_teacher_close_to_student(kind, eps):
    """Near convergence (KL ~ eps^2) the gradient is a small difference of the two softmax sums."""
    gen = torch.Generator().manual_seed(9)
    n, v, hd = 8, 3000, 64
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd) * 5
    h_t = h + eps * torch.randn(n, hd, generator=gen, dtype=torch.float64)
    teacher = HiddenTarget(h_t) if kind == "hidden" else torch.log_softmax(h_t @ W.T, -1)
    assert_within_twice_reference(h, W, teacher, torch.float32, reduction="none")


@pytest.mark.parametrize("kind", KINDS + ["dense-inf"])
def test_huge_logits(kind):
    """Student and teacher logits around +-1e4: finite, and as close to fp64 as the fp32 reference."""
    gen = torch.Generator().manual_seed(5)
    n, v, hd = 4, 300, 32
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64) * 1e3
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) * 10 / math.sqrt(hd)
    if kind == "dense-inf":  # a one-hot teacher with exact zeros (log-probs of -inf)
        teacher = torch.full((n, v), float("-inf"), dtype=torch.float64)
        teacher[:, 7] = 0.0
    elif kind == "hidden":
        teacher = HiddenTarget(torch.randn(n, hd, generator=gen, dtype=torch.float64) * 1e3)
    else:
        teacher = make_teacher(kind, n, v, hd, gen, sharp=1e4, lm_weight=W)
    assert_within_twice_reference(h, W, teacher, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_ignored_rows_never_leak(kind):
    """Rows of weight 0 give loss 0 and gradient 0 whatever their teacher holds (NaN, padding ids)."""
    gen = torch.Generator().manual_seed(6)
    n, v, hd = 6, 500, 16
    h = torch.randn(n, hd, generator=gen)
    W = torch.randn(v, hd, generator=gen)
    teacher = cast(make_teacher(kind, n, v, hd, gen, lm_weight=W.double()), torch.float32)
    bad = [1, 4]
    if isinstance(teacher, SparseTarget):
        teacher.ids[bad] = -100  # padding
        teacher.probs[bad] = float("nan")
        if teacher.tail is not None:
            teacher.tail[bad] = float("nan")
    elif isinstance(teacher, HiddenTarget):
        teacher.hidden[bad] = float("nan")
    elif isinstance(teacher, CompactTarget):
        teacher.wbar[bad] = float("nan")
        teacher.neg_entropy[bad] = float("nan")
    else:
        teacher[bad] = float("nan")
    tw = torch.ones(n)
    tw[bad] = 0
    loss, grad = cpp.softmax_kl_rows(h, W, teacher, 1.0, tw, True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss[bad] == 0).all() and (grad[bad] == 0).all()
    keep = [i for i in range(n) if i not in bad]
    want_loss, want_grad = reference.softmax_kl_rows(
        h[keep].double(), W.double(), cast(teacher[keep], torch.float64), 1.0, None, True
    )
    torch.testing.assert_close(loss[keep].double(), want_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[keep].double(), want_grad, rtol=1e-4, atol=1e-5)

    out = softmax_kl(h.clone().requires_grad_(), W, teacher, token_weight=torch.zeros(n), backend="cpp")
    assert out.item() == 0.0


def test_sparse_ids_repeated_in_a_row_match_reference():
    gen = torch.Generator().manual_seed(10)
    h, W = (
        torch.randn(3, 16, generator=gen, dtype=torch.float64),
        torch.randn(300, 16, generator=gen, dtype=torch.float64),
    )
    ids = torch.tensor([[5, 9, 5, 299], [0, 0, 0, 0], [7, 8, 9, 10]])
    probs = torch.full((3, 4), 0.2, dtype=torch.float64)
    teacher = SparseTarget(ids, probs, torch.full((3,), 0.2, dtype=torch.float64))
    for got, want in zip(
        cpp.softmax_kl_rows(h, W, teacher, 1.3, None, True), reference.softmax_kl_rows(h, W, teacher, 1.3, None, True)
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_empty_batch_and_no_grad():
    h = torch.zeros(0, 8, requires_grad=True)
    out = softmax_kl(h, torch.randn(40, 8), torch.zeros(0, 40), backend="cpp")
    out.backward()
    assert out.item() == 0.0 and h.grad.shape == (0, 8)
    h, W = torch.randn(5, 8), torch.randn(40, 8)
    t = torch.log_softmax(torch.randn(5, 40), -1)
    loss, grad = cpp.softmax_kl_rows(h, W, t, 1.0, None, False)
    assert grad is None and loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference.softmax_kl_rows(h, W, t, 1.0, None, False)[0])


def test_w_gets_no_gradient_and_fp64_stays_fp64():
    h = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    loss = softmax_kl(h, W, torch.log_softmax(torch.randn(4, 40, dtype=torch.float64), -1), backend="cpp")
    loss.backward()
    assert loss.dtype == torch.float64 and h.grad.dtype == torch.float64 and W.grad is None


def test_non_contiguous_inputs_are_accepted():
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(8, 6, generator=gen).T  # [6, 8], non-contiguous
    W = torch.randn(8, 50, generator=gen).T
    t = torch.log_softmax(torch.randn(50, 6, generator=gen), 0).T
    want = softmax_kl(h, W, t, reduction="none", backend="reference")
    torch.testing.assert_close(softmax_kl(h, W, t, reduction="none", backend="cpp"), want)


def test_ops_check_their_inputs():
    ops = torch.ops.fastsoft
    h, W, t = torch.randn(4, 8), torch.randn(40, 8), torch.zeros(4, 40)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.softmax_kl_rows_dense(h, W, torch.zeros(40, 4).T, 1.0, None, True)
    with pytest.raises(RuntimeError, match="fp32, fp64, bf16 or fp16"):
        ops.softmax_kl_rows_dense(h.long(), W, t, 1.0, None, True)
    with pytest.raises(RuntimeError, match=r"shape \[N, V\]"):
        ops.softmax_kl_rows_dense(h, W, torch.zeros(4, 41), 1.0, None, True)
    with pytest.raises(RuntimeError, match="temperature"):
        ops.softmax_kl_rows_dense(h, W, t, 0.0, None, True)
    with pytest.raises(RuntimeError, match="token_weight"):
        ops.softmax_kl_rows_dense(h, W, t, 1.0, torch.ones(3), True)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        ops.softmax_kl_rows_sparse(h, W, torch.full((4, 1), 40), torch.ones(4, 1), None, 1.0, None, True)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ops.softmax_kl_rows_sparse(h, W, torch.zeros(4, 1), torch.ones(4, 1), None, 1.0, None, True)
    with pytest.raises(RuntimeError, match="shape of hidden"):
        ops.softmax_kl_rows_hidden(h, W, torch.zeros(4, 7), 1.0, None, True)
    with pytest.raises(RuntimeError, match="wbar must have the shape of hidden"):
        ops.softmax_kl_rows_compact(h, W, torch.zeros(4, 7), torch.zeros(4), 1.0, None, True)
    with pytest.raises(RuntimeError, match=r"neg_entropy must have shape \[4\]"):
        ops.softmax_kl_rows_compact(h, W, torch.zeros(4, 8), torch.zeros(3), 1.0, None, True)
    with pytest.raises(RuntimeError, match="fp32, fp64, bf16 or fp16"):
        ops.softmax_kl_rows_compact(h, W, torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), 1.0, None, True)


def test_registered_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(8)
    h, W = torch.randn(5, 8, generator=gen), torch.randn(40, 8, generator=gen)
    tw = torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0])
    ids = torch.randint(0, 40, (5, 3), generator=gen)
    ops = torch.ops.fastsoft
    for op, args in [
        (ops.softmax_kl_rows_dense, (h, W, torch.log_softmax(torch.randn(5, 40, generator=gen), -1), 1.5, tw, True)),
        (ops.softmax_kl_rows_sparse, (h, W, ids, torch.full((5, 3), 0.2), torch.full((5,), 0.4), 1.0, None, True)),
        (ops.softmax_kl_rows_hidden, (h, W, torch.randn(5, 8, generator=gen), 1.0, None, False)),
        (
            ops.softmax_kl_rows_compact,
            (h, W, torch.randn(5, 8, generator=gen), -torch.rand(5, generator=gen), 0.7, tw, True),
        ),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_explicit_cpp_backend_raises_when_turned_off(monkeypatch):
    monkeypatch.setenv("FASTSOFT_SKIP_EXT", "1")
    cpp._load.cache_clear()
    try:
        assert cpp.is_available() == (False, "the C++ backend is turned off (FASTSOFT_SKIP_EXT=1)")
        with pytest.raises(BackendUnavailable, match="FASTSOFT_SKIP_EXT"):
            softmax_kl(torch.randn(2, 4), torch.randn(10, 4), torch.zeros(2, 10), backend="cpp")
        with pytest.raises(BackendUnavailable, match="FASTSOFT_SKIP_EXT"):
            cpp.softmax_kl_rows(torch.randn(2, 4), torch.randn(10, 4), torch.zeros(2, 10), 1.0, None, True)
    finally:
        monkeypatch.undo()
        cpp._load.cache_clear()
