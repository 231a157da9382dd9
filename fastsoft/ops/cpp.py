"""The C++ CPU backend (``csrc/``): ``softmax_kl`` (``softmax_kl.cpp``) and the decoder layer's fused small ops
(``layers.cpp``, :mod:`fastsoft.ops.layers`), registered as ``torch.ops.fastsoft.*``.

It is loaded from ``fastsoft._C`` when ``setup.py`` built it at install (and the source has not changed
since); otherwise it is built just in time with ``torch.utils.cpp_extension.load`` (ninja) into
``$FASTSOFT_EXT_DIR`` or ``~/.cache/fastsoft/ext/<torch>-<python>``, once per machine and source version.
``FASTSOFT_SKIP_EXT=1`` turns the backend off. :func:`is_available` says whether it can run and, if not, why.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import torch

from fastsoft.errors import BackendUnavailable
from fastsoft.ops.targets import (
    CompactTarget,
    HiddenTarget,
    SparseTarget,
    Teacher,
    as_target,
    check_divergence,
    check_grad_filter,
)

_SOURCES = ("softmax_kl.cpp", "layers.cpp")  # compiled into one extension, with their header vec_math.h
_HEADERS = ("vec_math.h",)
_FLAGS = [
    "-O3",
    "-fopenmp",
    "-fno-trapping-math",
    "-fno-math-errno",
]  # as ext_modules in setup.py; lets the exp loops vectorise


def _source_folder() -> Path | None:
    """The C++ sources' folder of a source checkout (``csrc/``) or of an installed package (``fastsoft/csrc/``)."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package.parent / "csrc", package / "csrc"):
        if all((folder / name).is_file() for name in _SOURCES + _HEADERS):
            return folder
    return None


def _build_dir() -> Path:
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    root = os.environ.get("FASTSOFT_EXT_DIR") or Path.home() / ".cache" / "fastsoft" / "ext"
    return Path(root) / tag


@functools.cache
def _load() -> tuple[bool, str]:
    if os.environ.get("FASTSOFT_SKIP_EXT") == "1":
        return False, "the C++ backend is turned off (FASTSOFT_SKIP_EXT=1)"
    folder = _source_folder()
    built = importlib.util.find_spec("fastsoft._C")
    newest = max((folder / name).stat().st_mtime for name in _SOURCES + _HEADERS) if folder else 0.0
    # The build from install, unless a source next to it changed since (an edited checkout): then JIT.
    if built is not None and not (built.origin and newest > os.path.getmtime(built.origin)):
        try:
            import fastsoft._C  # noqa: F401  (registers torch.ops.fastsoft.softmax_kl_rows_*)

            return True, ""
        except (ImportError, OSError):  # e.g. built against another torch: build just in time instead
            pass
    if folder is None:
        return (
            False,
            f"the C++ backend was not built at install and its sources {', '.join(_SOURCES)} are not shipped with this install",
        )
    try:
        from torch.utils.cpp_extension import load

        build_dir = _build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        load(
            name="fastsoft_cpu_ops",
            sources=[str(folder / name) for name in _SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a compile error: the dispatcher falls back
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        return False, f"the C++ backend failed to build just in time ({type(error).__name__}: {first_line})"
    return True, ""


def is_available() -> tuple[bool, str]:
    """``(True, "")`` when the C++ backend can run, else ``(False, reason)``. Builds it on first call if needed."""
    return _load()


def softmax_kl_rows(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    teacher: Teacher,
    temperature: float,
    token_weight: torch.Tensor | None,
    need_grad: bool,
    divergence: str = "forward",
    beta: float = 0.5,
    grad_filter: tuple[torch.Tensor, float] | None = None,
):
    """The backend row contract of ``fastsoft.ops.reference.softmax_kl_rows``, on CPU tensors.

    ``divergence="reverse" | "jsd"`` (dense and hidden teachers) runs ``softmax_kl_rows_divergence``: two passes over
    the vocabulary per row block (``kernels/softmax_kl.md`` §2b).

    Returns ``loss [N]`` fp32 (fp64 for fp64 ``hidden``/``lm_weight``, unweighted) and
    ``d loss_n / d hidden_n`` ``[N, H]`` in ``hidden.dtype`` (or None). Memory: O(threads x tile),
    never ``[N, V]``; no gradient for ``lm_weight``.
    """
    teacher = as_target(teacher)
    ok, why = is_available()
    if not ok:
        raise BackendUnavailable(why)
    ops = torch.ops.fastsoft
    hidden, lm_weight = hidden.detach().contiguous(), lm_weight.detach().contiguous()
    token_weight = None if token_weight is None else token_weight.detach().contiguous()
    if grad_filter is not None:  # the compact path with the tile filter (see compact_rows in csrc/softmax_kl.cpp)
        check_grad_filter(teacher, divergence, need_grad)
        wnorm, scale = grad_filter
        loss, grad, dropped, skipped = ops.softmax_kl_rows_compact_filtered(
            hidden,
            lm_weight,
            teacher.wbar.detach().contiguous(),
            teacher.neg_entropy.detach().contiguous(),
            float(temperature),
            token_weight,
            wnorm.detach().contiguous(),
            float(scale),
        )
        share = torch.tensor(skipped / max(1, hidden.shape[0] * lm_weight.shape[0]), dtype=torch.float32)
        return loss, grad, dropped, share
    if divergence != "forward":  # reverse KL or JSD: the target types that serve them (dense and hidden)
        check_divergence(teacher, divergence)
        is_hidden = isinstance(teacher, HiddenTarget)
        loss, grad = ops.softmax_kl_rows_divergence(
            hidden,
            lm_weight,
            (teacher.hidden if is_hidden else teacher.logprobs).detach().contiguous(),
            is_hidden,
            divergence,
            float(beta),
            float(temperature),
            token_weight,
            need_grad,
        )
    elif isinstance(teacher, SparseTarget):
        tail = None if teacher.tail is None else teacher.tail.detach().contiguous()
        loss, grad = ops.softmax_kl_rows_sparse(
            hidden,
            lm_weight,
            teacher.ids.contiguous(),
            teacher.probs.detach().contiguous(),
            tail,
            float(temperature),
            token_weight,
            need_grad,
        )
    elif isinstance(teacher, CompactTarget):
        loss, grad = ops.softmax_kl_rows_compact(
            hidden,
            lm_weight,
            teacher.wbar.detach().contiguous(),
            teacher.neg_entropy.detach().contiguous(),
            float(temperature),
            token_weight,
            need_grad,
        )
    elif isinstance(teacher, HiddenTarget):
        loss, grad = ops.softmax_kl_rows_hidden(
            hidden, lm_weight, teacher.hidden.detach().contiguous(), float(temperature), token_weight, need_grad
        )
    else:
        loss, grad = ops.softmax_kl_rows_dense(
            hidden, lm_weight, teacher.logprobs.detach().contiguous(), float(temperature), token_weight, need_grad
        )
    return loss, (grad if need_grad else None)
