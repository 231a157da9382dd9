"""CompactTarget: a dense or hidden teacher in H + 1 numbers a token, exact for the forward KL.

``KL(q || p) = sum q log q - h . wbar / T + lse`` and ``dh = (sum p W - wbar) / T`` with ``wbar = sum q W``:
in fp64 the compact target must give the full formula's value and gradient (``softmax_kl_naive`` with the
dense / hidden teacher) to ~1e-12, at every temperature, and every backend must match it. The backend suites
(tests/ops/test_softmax_kl*.py) also run the ``compact`` kind of ``softmax_kl_cases.make_teacher``.
"""

from __future__ import annotations

import math

import pytest
import torch
from softmax_kl_cases import stable_seed

from fastsoft.ops import CompactTarget, DenseTarget, HiddenTarget, reference, softmax_kl
from fastsoft.ops.reference import softmax_kl_naive

TEMPERATURES = [0.05, 0.3, 1.0, 2.5, 20.0]


def _problem(seed, n=9, v=1271, hd=123, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hd, generator=gen, dtype=torch.float64)
    W = torch.randn(v, hd, generator=gen, dtype=torch.float64) / math.sqrt(hd) * scale
    return gen, h, W


def _value_and_grad(h, W, teacher, T, fn=softmax_kl_naive):
    x = h.detach().clone().requires_grad_()
    rows = fn(x, W, teacher, T)
    rows.sum().backward()
    return rows.detach(), x.grad


def _full_teacher(source, gen, n, v, hd):
    if source == "dense":
        return DenseTarget(torch.log_softmax(2 * torch.randn(n, v, generator=gen, dtype=torch.float64), -1))
    return HiddenTarget(2 * torch.randn(n, hd, generator=gen, dtype=torch.float64))


def _compact(full, W, T, **kw):
    if isinstance(full, DenseTarget):
        return CompactTarget.from_logprobs(full.logprobs, W, T, **kw)
    return CompactTarget.from_hidden(full.hidden, W, T, **kw)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("source", ["dense", "hidden"])
def test_compact_is_exact_in_fp64(source, temperature):
    gen, h, W = _problem(stable_seed("exact", source, temperature))
    full = _full_teacher(source, gen, len(h), W.shape[0], h.shape[1])
    compact = _compact(full, W, temperature, chunk_rows=4)  # several build chunks
    want_value, want_grad = _value_and_grad(h, W, full, temperature)
    got_value, got_grad = _value_and_grad(h, W, compact, temperature)
    vscale, gscale = want_value.abs().max().item(), want_grad.abs().max().item()
    torch.testing.assert_close(got_value, want_value, rtol=1e-12, atol=1e-12 * max(1.0, vscale))
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12 * max(1.0, gscale))
    # the reference backend's fused rows give the same numbers
    ref_value, ref_grad = reference.softmax_kl_rows(h, W, compact, temperature, None, True)
    torch.testing.assert_close(ref_value, want_value, rtol=1e-12, atol=1e-12 * max(1.0, vscale))
    torch.testing.assert_close(ref_grad, want_grad, rtol=1e-12, atol=1e-12 * max(1.0, gscale))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_teacher_with_exact_zeros(temperature):
    """Log-probs of -inf (q = 0) add 0 log 0 = 0 to the entropy and nothing to wbar; truth: the dense reference rows
    (the naive formula itself gives 0 * inf = NaN there)."""
    gen, h, W = _problem(stable_seed("zeros", temperature))
    teacher = torch.log_softmax(8 * torch.randn(len(h), W.shape[0], generator=gen, dtype=torch.float64), -1)
    teacher[0, : W.shape[0] // 2] = float("-inf")
    teacher[1, 1:] = float("-inf")  # one-hot
    want = reference.softmax_kl_rows(h, W, teacher, temperature, None, True)
    got = reference.softmax_kl_rows(h, W, CompactTarget.from_logprobs(teacher, W, temperature), temperature, None, True)
    for w, g in zip(want, got):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("source", ["dense", "hidden"])
def test_build_is_chunked_and_independent_of_the_chunk(source, monkeypatch):
    gen, h, W = _problem(stable_seed("chunk", source), n=13, v=300, hd=16)
    full = _full_teacher(source, gen, 13, 300, 16)
    one = _compact(full, W, 0.7, chunk_rows=13)
    shapes = []
    real_log_softmax = torch.log_softmax
    monkeypatch.setattr(
        torch, "log_softmax", lambda x, *a, **k: shapes.append(tuple(x.shape)) or real_log_softmax(x, *a, **k)
    )
    chunked = _compact(full, W, 0.7, chunk_rows=4)
    assert shapes and max(s[0] for s in shapes) <= 4
    torch.testing.assert_close(chunked.wbar, one.wbar, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(chunked.neg_entropy, one.neg_entropy, rtol=1e-14, atol=1e-14)


def test_build_dtypes():
    gen, h, W = _problem(1, n=4, v=50, hd=8)
    t64 = CompactTarget.from_hidden(h, W, 1.0)
    t32 = CompactTarget.from_hidden(h.float(), W.float(), 1.0)
    t16 = CompactTarget.from_logprobs(torch.log_softmax(h.half() @ W.half().T, -1), W.bfloat16(), 2.0)
    assert t64.wbar.dtype == t64.neg_entropy.dtype == torch.float64
    assert t32.wbar.dtype == t16.wbar.dtype == t16.neg_entropy.dtype == torch.float32
    assert (t32.neg_entropy <= 0).all()


def test_protocol_rows_to_concat_tensors():
    gen, h, W = _problem(2, n=6, v=40, hd=8)
    t = CompactTarget.from_hidden(h, W, 1.5)
    assert len(t) == 6 and len(t[1:4]) == 3 and t[1:4].temperature == 1.5
    assert torch.equal(t[torch.tensor([0, 5])].wbar, t.wbar[[0, 5]])
    both = CompactTarget.concat([t[:2], t[2:]])
    assert torch.equal(both.wbar, t.wbar) and torch.equal(both.neg_entropy, t.neg_entropy)
    back = CompactTarget.from_tensors(t.tensors())
    assert back.temperature == 1.5 and torch.equal(back.wbar, t.wbar)
    assert t.to("cpu").temperature == 1.5
    with pytest.raises(ValueError, match="different temperatures"):
        CompactTarget.concat([t, CompactTarget.from_hidden(h, W, 1.0)])
    with pytest.raises(ValueError, match="wbar"):
        CompactTarget(torch.zeros(3, 4), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        CompactTarget(torch.zeros(3, 4), torch.zeros(3), 0.0)


def test_wrong_temperature_or_hidden_size_is_refused():
    gen, h, W = _problem(3, n=4, v=40, hd=8)
    t = CompactTarget.from_hidden(h, W, 2.0)
    with pytest.raises(ValueError, match="built at temperature 2.0"):
        softmax_kl(h, W, t, temperature=1.0)
    with pytest.raises(ValueError, match="hidden size"):
        softmax_kl(h[:, :4], W[:, :4], t, temperature=2.0)
    softmax_kl(h, W, t, temperature=2.0, backend="reference")  # the right one runs


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ignored_rows_give_zero_and_never_leak_nan(backend):
    gen, h, W = _problem(4, n=6, v=500, hd=16)
    t = CompactTarget.from_hidden(torch.randn(6, 16, generator=gen, dtype=torch.float64), W, 1.0)
    t = CompactTarget(t.wbar.float(), t.neg_entropy.float(), 1.0)
    t.wbar[[1, 4]] = float("nan")
    t.neg_entropy[[1, 4]] = float("nan")
    tw = torch.ones(6)
    tw[[1, 4]] = 0
    x = h.float().requires_grad_()
    out = softmax_kl(x, W.float(), t, token_weight=tw, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert (out[[1, 4]] == 0).all() and (x.grad[[1, 4]] == 0).all()
    assert softmax_kl(x, W.float(), t, token_weight=torch.zeros(6), backend=backend).item() == 0.0


@pytest.mark.parametrize("rows", [1, 37, 256, 300], ids=lambda n: f"N={n}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_compact_splits_rows_or_vocabulary_alike(rows, dtype):
    """With at most BN = 256 rows the C++ backend's threads split the vocabulary (each keeps its own max, sum and O,
    merged at the end), else the rows; one thread never splits. Every way gives the fp64 formula's value and
    gradient (V not a multiple of the 256-column tile, so the splits get unequal tiles; two rows ignored)."""
    from fastsoft.ops import cpp

    ok, why = cpp.is_available()
    if not ok:
        pytest.skip(why)
    gen, h, W = _problem(stable_seed("splits", rows), n=rows, v=1000, hd=48)
    teacher = CompactTarget.from_hidden(2 * torch.randn(rows, 48, generator=gen, dtype=torch.float64), W, 0.7)
    keep = torch.ones(rows)
    keep[[0, rows // 2]] = 0
    want_value, want_grad = reference.softmax_kl_rows(h, W, teacher, 0.7, keep, True)
    cast = CompactTarget(teacher.wbar.to(dtype), teacher.neg_entropy.to(dtype), 0.7)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            value, grad = cpp.softmax_kl_rows(h.to(dtype), W.to(dtype), cast, 0.7, keep.to(dtype), True)
            torch.testing.assert_close(value.double(), want_value * keep, **tol, msg=f"{threads} threads")
            torch.testing.assert_close(grad.double(), want_grad * keep[:, None], **tol, msg=f"{threads} threads")
    finally:
        torch.set_num_threads(previous)
