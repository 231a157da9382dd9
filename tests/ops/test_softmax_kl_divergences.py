"""softmax_kl with ``divergence="reverse"`` (KL(p || q)) and ``"jsd"`` (JSD_beta(q, p)), every CPU backend.

Ground truth: autograd through ``softmax_kl_naive`` in fp64. The closed-form gradients of kernels/softmax_kl.md
(``dL/dz = p (log p - log q - L)`` and ``(1 - beta) p (log p - log m - sum p (log p - log m))``) are checked against
autograd first. Error bound in fp32 (as flash-attn and cut-cross-entropy test): at most 2x the same-dtype naive error, plus a small atol.
The Triton kernels are checked under the interpreter in tests/ops/test_softmax_kl_triton.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from softmax_kl_cases import cast_teacher, make_teacher, stable_seed

from fastsoft.ops import CompactTarget, HiddenTarget, SparseTarget, cpp, softmax_kl
from fastsoft.ops.reference import softmax_kl_naive

DIVERGENCES = [("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.3), ("jsd", 0.9)]
DIV_IDS = ["rkl", "jsd0.5", "jsd0.3", "jsd0.9"]


def _backends():
    backends = ["reference"]
    ok, why = cpp.is_available()
    if ok:
        backends.append("cpp")
    elif os.environ.get("FASTSOFT_SKIP_EXT") != "1":
        raise AssertionError(f"the C++ backend should build here: {why}")
    return backends


BACKENDS = _backends()


def run(backend, h, W, teacher, grad_out=None, **kw):
    """Value and d(sum(value * grad_out))/dh of the public op, in fp64."""
    h = h.detach().clone().requires_grad_()
    out = softmax_kl(h, W, teacher, backend=backend, **kw)
    (out * (1 if grad_out is None else grad_out.to(out.dtype))).sum().backward()
    return out.detach().double(), h.grad.double()


def naive(h, W, teacher, temperature, divergence, beta, token_weight=None, reduction="none", grad_out=None):
    """The same through autograd of softmax_kl_naive (in the inputs' dtype, softmax at least fp32)."""
    h = h.detach().clone().requires_grad_()
    rows = softmax_kl_naive(h, W, teacher, temperature, divergence, beta)
    if token_weight is not None:
        rows = rows * token_weight.to(rows.dtype)
    total = rows.sum()
    denominator = token_weight.sum() if token_weight is not None else rows.shape[0]
    out = {"none": rows, "sum": total, "mean": total / denominator}[reduction]
    (out * (1 if grad_out is None else grad_out.to(out.dtype))).sum().backward()
    return out.detach().double(), h.grad.double()


def setup(seed, n, v, hd, kind, temperature, scale=3.0, sharp=1.0):
    gen = torch.Generator().manual_seed(stable_seed(*seed))
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd) * scale
    teacher = make_teacher(kind, n, v, hd, gen, sharp=sharp, lm_weight=W, temperature=temperature)
    return gen, h, W, teacher


@pytest.mark.parametrize("beta", [0.5, 0.2])
@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_closed_form_gradients_match_autograd(divergence, beta):
    """The derivation of kernels/softmax_kl.md, in fp64, on logits directly."""
    gen = torch.Generator().manual_seed(stable_seed(divergence, beta))
    z = torch.randn(5, 97, generator=gen, dtype=torch.float64, requires_grad=True)
    logq = torch.log_softmax(2 * torch.randn(5, 97, generator=gen, dtype=torch.float64), -1)
    logp = torch.log_softmax(z, -1)
    p, q = logp.exp(), logq.exp()
    if divergence == "reverse":
        loss = (p * (logp - logq)).sum(-1)
        want = p * (logp - logq - loss[:, None])
    else:
        logm = torch.logaddexp(math.log(beta) + logq, math.log(1 - beta) + logp)
        loss = beta * (q * (logq - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)
        g = logp - logm
        want = (1 - beta) * p * (g - (p * g).sum(-1, keepdim=True))
        torch.testing.assert_close(logm.exp(), beta * q + (1 - beta) * p, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    torch.testing.assert_close(grad, want.detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("kind", ["dense", "hidden"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_fp64_value_and_gradient_match_naive(backend, div, kind, temperature, weighted):
    divergence, beta = div
    reduction = ["mean", "sum", "none"][stable_seed(kind, temperature, weighted) % 3]
    gen, h, W, teacher = setup((backend, div, kind, temperature, weighted), 9, 1271, 123, kind, temperature)
    tw = None
    if weighted:
        tw = torch.rand(9, generator=gen, dtype=torch.float64) + 0.1
        tw[[2, 5]] = 0
    grad_out = torch.randn(9 if reduction == "none" else (), generator=gen, dtype=torch.float64)
    kw = dict(temperature=temperature, token_weight=tw, reduction=reduction, grad_out=grad_out)
    got = run(backend, h, W, teacher, divergence=divergence, beta=beta, **kw)
    want = naive(h, W, teacher, divergence=divergence, beta=beta, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", DIVERGENCES[:2], ids=DIV_IDS[:2])
@pytest.mark.parametrize("kind", ["dense", "hidden"])
@pytest.mark.parametrize("shape", [(6, 1271, 123), (4, 20_011, 576)], ids=["V1271-H123", "V20011-H576"])
def test_fp32_error_within_twice_naive(backend, div, kind, shape):
    """fp32 vs fp64 truth, value and gradient, against the same-dtype naive torch error."""
    divergence, beta = div
    n, v, hd = shape
    gen, h, W, teacher = setup((div, kind, shape), n, v, hd, kind, 0.8, scale=4.0)
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)
    kw = dict(temperature=0.8, divergence=divergence, beta=beta, reduction="none", grad_out=grad_out)
    truth = naive(h, W, teacher, **kw)
    h32, W32, t32 = h.float(), W.float(), cast_teacher(teacher, torch.float32)
    theirs = naive(h32, W32, t32, **kw)
    ours = run(backend, h32, W32, t32, **kw)
    for name, want, ref, got in zip(("value", "gradient"), truth, theirs, ours):
        assert torch.isfinite(got).all(), name
        bound = 2 * (ref - want).abs().max().item() + 1e-6 * max(1.0, want.abs().max().item())
        err = (got - want).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_teacher_zeros_give_inf_reverse_kl_never_nan(backend, dtype):
    """q_v = 0 where p_v > 0: reverse KL is +inf (its row's gradient 0); JSD stays finite; other rows exact."""
    gen = torch.Generator().manual_seed(11)
    n, v, hd = 4, 300, 16
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / 4
    teacher = torch.log_softmax(2 * torch.randn(n, v, generator=gen, dtype=torch.float64), -1)
    teacher[0, :150] = float("-inf")  # exact zeros in row 0
    teacher[2, 7] = float("-inf")
    h, W, teacher = h.to(dtype), W.to(dtype), teacher.to(dtype)
    loss, grad = run(backend, h, W, teacher, divergence="reverse", reduction="none")
    assert loss[0] == math.inf and loss[2] == math.inf
    assert not loss.isnan().any() and torch.isfinite(grad).all()
    assert (grad[[0, 2]] == 0).all()
    want = naive(h.double(), W.double(), teacher.double(), 1.0, "reverse", 0.5)
    torch.testing.assert_close(loss[[1, 3]], want[0][[1, 3]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[[1, 3]], want[1][[1, 3]], rtol=1e-5, atol=1e-6)
    loss, grad = run(backend, h, W, teacher, divergence="jsd", beta=0.3, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want = naive(h.double(), W.double(), teacher.double(), 1.0, "jsd", 0.3)
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", DIVERGENCES[:2], ids=DIV_IDS[:2])
@pytest.mark.parametrize("kind", ["dense", "hidden"])
def test_ignored_rows_never_leak(backend, div, kind):
    divergence, beta = div
    gen, h, W, teacher = setup((div, kind), 6, 500, 16, kind, 1.0)
    bad = [1, 4]
    if isinstance(teacher, HiddenTarget):
        teacher.hidden[bad] = float("nan")
    else:
        teacher[bad] = float("nan")
    tw = torch.ones(6, dtype=torch.float64)
    tw[bad] = 0
    loss, grad = run(backend, h, W, teacher, divergence=divergence, beta=beta, token_weight=tw, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss[bad] == 0).all() and (grad[bad] == 0).all()
    keep = [0, 2, 3, 5]
    want = naive(h[keep], W, teacher[keep], 1.0, divergence, beta)
    torch.testing.assert_close(loss[keep], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad[keep], want[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_distributions_give_zero(backend):
    gen = torch.Generator().manual_seed(12)
    h, W = (
        torch.randn(5, 24, generator=gen, dtype=torch.float64),
        torch.randn(333, 24, generator=gen, dtype=torch.float64),
    )
    for divergence in ("reverse", "jsd"):
        loss, grad = run(backend, h, W, HiddenTarget(h.clone()), divergence=divergence, reduction="none")
        assert loss.abs().max() < 1e-12 and grad.abs().max() < 1e-12


def test_forward_default_is_unchanged():
    gen, h, W, teacher = setup(("forward",), 7, 400, 32, "dense", 1.5)
    for backend in BACKENDS:
        a = softmax_kl(h, W, teacher, temperature=1.5, backend=backend, reduction="none")
        b = softmax_kl(h, W, teacher, temperature=1.5, backend=backend, reduction="none", divergence="forward")
        assert torch.equal(a, b)


def test_refusals():
    gen, h, W, teacher = setup(("refuse",), 4, 40, 8, "dense", 1.0)
    sparse = make_teacher("topk", 4, 40, 8, gen)
    compact = CompactTarget.from_logprobs(teacher, W, 1.0)
    for target in (sparse, SparseTarget.one_hot(torch.zeros(4, dtype=torch.long)), compact):
        for divergence in ("reverse", "jsd"):
            with pytest.raises(ValueError, match="not linear in the teacher"):
                softmax_kl(h, W, target, divergence=divergence)
    for beta in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            softmax_kl(h, W, teacher, divergence="jsd", beta=beta)
    with pytest.raises(ValueError, match="divergence must be one of forward, reverse, jsd"):
        softmax_kl(h, W, teacher, divergence="kl")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ backend is turned off")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["dense", "hidden"])
def test_cpp_low_precision_inputs_match_reference(dtype, kind):
    """bf16/fp16 inputs are upcast per tile in both backends: the same fp32 computation, to fp32 rounding."""
    gen, h, W, teacher = setup(("lowp", dtype, kind), 33, 777, 64, kind, 1.5)
    h, W, teacher = h.to(dtype), W.to(dtype), cast_teacher(teacher, dtype)
    tw = torch.ones(33)
    tw[7] = 0
    for divergence, beta in DIVERGENCES[:2]:
        kw = dict(temperature=1.5, divergence=divergence, beta=beta, token_weight=tw, reduction="none")
        want, got = run("reference", h, W, teacher, **kw), run("cpp", h, W, teacher, **kw)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-2 * want[1].abs().max().item())


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ backend is turned off")
def test_cpp_divergence_op_checks_and_opcheck():
    ops = torch.ops.fastsoft
    gen = torch.Generator().manual_seed(13)
    h, W = torch.randn(5, 8, generator=gen), torch.randn(40, 8, generator=gen)
    t = torch.log_softmax(torch.randn(5, 40, generator=gen), -1)
    tw = torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0])
    with pytest.raises(RuntimeError, match="reverse or jsd"):
        ops.softmax_kl_rows_divergence(h, W, t, False, "forward", 0.5, 1.0, None, True)
    with pytest.raises(RuntimeError, match="strictly between 0 and 1"):
        ops.softmax_kl_rows_divergence(h, W, t, False, "jsd", 1.0, 1.0, None, True)
    with pytest.raises(RuntimeError, match=r"shape \[N, V\]"):
        ops.softmax_kl_rows_divergence(h, W, torch.zeros(5, 41), False, "reverse", 0.5, 1.0, None, True)
    with pytest.raises(RuntimeError, match="shape of hidden"):
        ops.softmax_kl_rows_divergence(h, W, torch.zeros(5, 7), True, "jsd", 0.5, 1.0, None, True)
    for args in [
        (h, W, t, False, "reverse", 0.5, 1.5, tw, True),
        (h, W, torch.randn(5, 8, generator=gen), True, "jsd", 0.3, 0.7, None, False),
    ]:
        torch.library.opcheck(ops.softmax_kl_rows_divergence, args, test_utils=("test_schema", "test_faketensor"))
