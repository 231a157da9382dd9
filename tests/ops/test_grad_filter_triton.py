"""The Triton backend's bounded gradient filter (``grad_filter=(wnorm, scale)``, compact teacher), interpreted on CPU.

Contract (kernels/softmax_kl.md §6): the gradient GEMM skips a ``BN x BV`` tile when every row has
``sum_v |dz_v| * max_v ||W_v|| <= scale * BV``; ``dropped[n]`` is ``sum`` over the skipped columns of
``|dz_v| ||W_v|| / T``, so ``||grad_exact[n] - grad[n]|| <= dropped[n]``; ``skipped`` is the share of the ``N x V``
products left out; the loss never changes.

``TRITON_INTERPRET=1`` is process-global (``triton.jit`` reads it when a kernel is defined), so, as in
``test_softmax_kl_triton.py``, the checks run in one worker subprocess started by a module fixture (in-process when
``TRITON_INTERPRET=1`` is already set). fp32 only: the interpreter's bf16 ``tl.dot`` is not faithful.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastsoft.ops import CompactTarget, HiddenTarget, reference

N, H, V = 37, 24, 1000
# several token chunks and vocabulary splits of the gradient GEMM (the per-split [split, N] buffers summed on the host)
SPLIT_ENV = {"FASTSOFT_SOFTMAX_KL_CHUNK_ROWS": "16", "FASTSOFT_SOFTMAX_KL_SPLIT_V": "3"}
# one chunk, one vocabulary range (on CPU tensors the launcher would otherwise split the vocabulary in 4)
ONE_ENV = {"FASTSOFT_SOFTMAX_KL_SPLIT_V": "1"}


def _problem(seed: int, peak: float, temperature: float = 1.0, weighted: bool = False):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    h = peak * torch.randn(N, H, generator=gen, dtype=torch.float64)
    h_teacher = peak * torch.randn(N, H, generator=gen, dtype=torch.float64)
    target = CompactTarget.from_hidden(h_teacher, W, temperature)  # fp64: the reference's exact teacher
    tw = None
    if weighted:
        tw = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1
        tw[[0, 5, 17, N - 1]] = 0
    return h, W, target, tw


def _fp32(target: CompactTarget) -> CompactTarget:
    return CompactTarget(target.wbar.float(), target.neg_entropy.float(), target.temperature)


def _call(h, W, target, T, tw, grad_filter=None, env=None):
    from fastsoft.kernels import softmax_kl as K

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return K.softmax_kl_rows(
            h.float(), W.float(), _fp32(target), T, None if tw is None else tw.float(), True, grad_filter=grad_filter
        )
    finally:
        for k, value in saved.items():
            os.environ.pop(k) if value is None else os.environ.__setitem__(k, value)


def _wnorm(W):
    return W.float().norm(dim=1)


def _scale_zero(env):
    h, W, target, _ = _problem(1, peak=1.0)
    loss0, grad0 = _call(h, W, target, 1.0, None, env=env)
    out = _call(h, W, target, 1.0, None, (_wnorm(W), 0.0), env=env)
    assert len(out) == 4 and out[2].shape == (N,) and out[3].shape == () and out[2].dtype == torch.float32
    loss, grad, dropped, skipped = out
    return {
        "skipped": skipped.item(),
        "dropped_max": dropped.abs().max().item(),
        "loss_diff": (loss - loss0).abs().max().item(),
        "grad_diff": (grad - grad0).abs().max().item(),
        "grad_scale": grad0.abs().max().item(),
    }


def _bound(seed, scale, T, weighted, env):
    """Peaked student (hidden = 8 randn): the filter skips a good share; the per-row error against the fp64
    unfiltered reference stays within dropped[n]."""
    h, W, target, tw = _problem(seed, peak=8.0, temperature=T, weighted=weighted)
    loss_exact, grad_exact = reference.softmax_kl_rows(h, W, target, T, tw, True)  # fp64, unfiltered
    loss0, _ = _call(h, W, target, T, tw, env=env)
    loss, grad, dropped, skipped = _call(h, W, target, T, tw, (_wnorm(W), scale), env=env)
    err = (grad.double() - grad_exact).norm(dim=1)
    excess = err - (dropped.double() * (1 + 1e-4) + 1e-6)
    result = {
        "skipped": skipped.item(),
        "excess_max": excess.max().item(),
        "loss_diff": (loss - loss0).abs().max().item(),
        "loss_vs_fp64": (loss.double() - loss_exact).abs().max().item(),
        "dropped_min": dropped.min().item(),
        "finite": bool(torch.isfinite(grad).all() and torch.isfinite(dropped).all()),
    }
    if tw is not None:
        ignored = tw == 0
        result["ignored_zero"] = bool(
            (grad[ignored] == 0).all() and (dropped[ignored] == 0).all() and (loss[ignored] == 0).all()
        )
        result["kept_dropped_positive"] = bool((dropped[~ignored] > 0).all())
    return result


def _everything(T, weighted, env):
    """A huge scale skips every tile: the gradient is the teacher part -wbar / T alone, dropped = sum_v p_v ||W_v|| / T."""
    h, W, target, tw = _problem(3, peak=2.0, temperature=T, weighted=weighted)
    loss0, _ = _call(h, W, target, T, tw, env=env)
    loss, grad, dropped, skipped = _call(h, W, target, T, tw, (_wnorm(W), 1e30), env=env)
    p = torch.softmax(h @ W.T / T, -1)  # fp64
    want_grad = -target.wbar / T
    want_dropped = (p * W.norm(dim=1)).sum(-1) / T
    if tw is not None:
        keep = (tw != 0)[:, None]
        want_grad = torch.where(keep, want_grad, torch.zeros_like(want_grad))
        want_dropped = torch.where(keep[:, 0], want_dropped, torch.zeros_like(want_dropped))
    return {
        "skipped": skipped.item(),
        "grad_rel": ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item(),
        "dropped_rel": ((dropped.double() - want_dropped).abs() / want_dropped.clamp_min(1e-300)).max().item(),
        "dropped_zero_where_ignored": bool((dropped.double()[want_dropped == 0] == 0).all()),
        "loss_diff": (loss - loss0).abs().max().item(),
    }


def _refusals():
    from fastsoft.kernels import softmax_kl as K

    h, W, target, _ = _problem(4, peak=1.0)
    h, W, compact = h.float(), W.float(), _fp32(target)
    filt = (_wnorm(W), 0.1)
    hidden_teacher = HiddenTarget(torch.randn(N, H))
    dense_teacher = torch.log_softmax(torch.randn(N, V), -1)
    attempts = {
        "hidden": lambda: K.softmax_kl_rows(h, W, hidden_teacher, 1.0, None, True, grad_filter=filt),
        "dense": lambda: K.softmax_kl_rows(h, W, dense_teacher, 1.0, None, True, grad_filter=filt),
        "hidden-reverse": lambda: K.softmax_kl_rows(h, W, hidden_teacher, 1.0, None, True, "reverse", grad_filter=filt),
        "compact-jsd": lambda: K.softmax_kl_rows(h, W, compact, 1.0, None, True, "jsd", grad_filter=filt),
        "no-grad": lambda: K.softmax_kl_rows(h, W, compact, 1.0, None, False, grad_filter=filt),
        "negative-scale": lambda: K.softmax_kl_rows(h, W, compact, 1.0, None, True, grad_filter=(filt[0], -1.0)),
        "wnorm-shape": lambda: K.softmax_kl_rows(h, W, compact, 1.0, None, True, grad_filter=(filt[0][:-1], 0.1)),
    }
    result = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            result[name] = "no error"
        except ValueError as error:
            result[name] = f"ValueError: {error}"
        except Exception as error:  # reported by the test
            result[name] = f"{type(error).__name__}: {error}"
    # without grad_filter: the 2-tuple, as before
    result["plain_len"] = len(K.softmax_kl_rows(h, W, compact, 1.0, None, True))
    empty = K.softmax_kl_rows(h[:0], W, compact[:0], 1.0, None, True, grad_filter=filt)
    result["empty"] = [len(empty), list(empty[2].shape), float(empty[3])]
    return result


CHECKS = {
    "scale-zero": lambda: _scale_zero(ONE_ENV),
    "scale-zero-chunks-split": lambda: _scale_zero(SPLIT_ENV),
    "bound-peaked": lambda: _bound(2, 1e-2, 1.0, False, ONE_ENV),
    "bound-peaked-chunks-split": lambda: _bound(2, 1e-2, 1.0, False, SPLIT_ENV),
    "bound-weighted-T0.7": lambda: _bound(5, 1e-2, 0.7, True, ONE_ENV),
    "bound-weighted-T0.7-chunks-split": lambda: _bound(5, 1e-2, 0.7, True, SPLIT_ENV),
    "everything-skipped": lambda: _everything(1.0, False, ONE_ENV),
    "everything-skipped-weighted-T0.7-chunks-split": lambda: _everything(0.7, True, SPLIT_ENV),
    "refusals": _refusals,
}


def _run_all(names) -> dict:
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in names:
            try:
                results[name] = CHECKS[name]()
            except Exception as error:  # reported per check by the parent
                import traceback

                results[name] = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"}
    return results


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _run_all(CHECKS)
    out = tmp_path_factory.mktemp("triton-interpret") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"the interpreter worker failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(out.read_text())


def _result(interpreted, name):
    result = interpreted[name]
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.parametrize("name", ["scale-zero", "scale-zero-chunks-split"])
def test_scale_zero_skips_nothing(name, interpreted):
    r = _result(interpreted, name)
    assert r["skipped"] == 0.0 and r["dropped_max"] == 0.0, r
    assert r["loss_diff"] == 0.0, r  # the filter never touches the forward
    assert r["grad_diff"] <= 1e-6 * max(1.0, r["grad_scale"]), r


@pytest.mark.parametrize(
    "name",
    ["bound-peaked", "bound-peaked-chunks-split", "bound-weighted-T0.7", "bound-weighted-T0.7-chunks-split"],
)
def test_dropped_bounds_the_error_per_row(name, interpreted):
    r = _result(interpreted, name)
    assert r["finite"], r
    assert r["skipped"] > 0.3, r
    assert r["excess_max"] <= 0.0, r  # ||grad - grad_exact|| <= dropped (1 + 1e-4) + 1e-6, every row
    assert r["loss_diff"] == 0.0, r
    assert r["loss_vs_fp64"] <= 1e-4, r
    if "ignored_zero" in r:
        assert r["ignored_zero"], "rows with token weight 0: loss, gradient and dropped exactly 0"
        assert r["kept_dropped_positive"], r


@pytest.mark.parametrize("name", ["everything-skipped", "everything-skipped-weighted-T0.7-chunks-split"])
def test_huge_scale_leaves_the_teacher_part(name, interpreted):
    r = _result(interpreted, name)
    assert r["skipped"] == 1.0, r
    assert r["grad_rel"] <= 1e-6, r  # grad == -wbar / T
    assert r["dropped_rel"] <= 1e-4, r  # dropped == sum_v p_v ||W_v|| / T
    assert r["dropped_zero_where_ignored"], r
    assert r["loss_diff"] == 0.0, r


def test_grad_filter_refusals_and_return_shapes(interpreted):
    r = _result(interpreted, "refusals")
    for name in ("hidden", "dense", "hidden-reverse", "compact-jsd", "no-grad", "negative-scale", "wnorm-shape"):
        assert r[name].startswith("ValueError"), (name, r[name])
    assert r["plain_len"] == 2
    assert r["empty"] == [4, [0], 0.0]


_HOPPER_CHECK = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from fastsoft.kernels import softmax_kl as K

fn = K._softmax_kl_bwd_kernel
while not isinstance(fn, JITFunction):
    fn = fn.fn
FLOATS = {"inv_temp", "filter_scale"}
I64 = {"stride_en", "stride_wv", "stride_gs", "stride_gn", "stride_ds", "stride_tn", "SS"}
DIV = {"stride_en", "stride_wv", "stride_gn", "stride_gs", "stride_ds", "stride_tn", "SS", "V", "H", "NVT", "V_SPLIT"}
PTRS = {"e_ptr": "*fp16", "f_ptr": "*fp16", "w_ptr": "*bf16", "g_ptr": "*bf16", "t_ptr": "*fp32", "ids_ptr": "*i32"}
out = {}
for filt in (False, True):
    c = dict(TEACHER=3, HAS_WEIGHT=True, FILTER=filt, LOG2K=0, BV_STATS=128, DOT=1, DOT_PRECISION="tf32",
             BN=128, BH=128, BV=64, stride_wh=1, stride_gh=1, stride_tc=1)
    sig = {}
    for n in fn.arg_names:
        if n in c:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = PTRS.get(n, "*fp32")
        else:
            sig[n] = "fp32" if n in FLOATS else "i64" if n in I64 else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in c and (n.endswith("_ptr") or n in DIV)}
    ck = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    out[str(filt)] = {"wgmma": "wgmma" in ck.asm["ptx"], "shared": ck.metadata.shared}
print(json.dumps(out))
"""


def test_filtered_backward_compiles_for_hopper_without_a_gpu():
    """The filtered gradient kernel (a data-dependent branch around the tile's dot) compiles to sm_90 with wgmma."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _HOPPER_CHECK], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("nvidia" not in proc.stderr.lower() and "ptxas" not in proc.stderr.lower()):
        pytest.fail(proc.stderr[-3000:])
    if proc.returncode != 0:
        pytest.skip(f"this Triton cannot target CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["False"]["wgmma"] and result["True"]["wgmma"], result


if __name__ == "__main__":  # the interpreter worker: python tests/ops/test_grad_filter_triton.py OUT.json [check ...]
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    names = sys.argv[2:] or list(CHECKS)
    results = _run_all(names)
    with open(sys.argv[1], "w") as fh:
        json.dump(results, fh, indent=1)
    bad = [n for n, r in results.items() if "error" in r]
    print(f"{len(results) - len(bad)} checks ran, {len(bad)} raised: {bad}")
