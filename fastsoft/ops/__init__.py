"""Loss ops. ``softmax_kl`` is the one entry point every objective goes through."""

from fastsoft.ops.softmax_kl import (
    BackendUnavailable,
    FilterReport,
    SoftmaxKLLoss,
    filtered_rows,
    resolve_backend,
    softmax_kl,
)
from fastsoft.ops.targets import (
    TARGET_TYPES,
    CompactTarget,
    DenseTarget,
    HiddenTarget,
    SparseTarget,
    Target,
    as_target,
    check_divergence,
    check_grad_filter,
)

__all__ = [
    "softmax_kl",
    "SoftmaxKLLoss",
    "DenseTarget",
    "SparseTarget",
    "HiddenTarget",
    "CompactTarget",
    "Target",
    "as_target",
    "TARGET_TYPES",
    "check_divergence",
    "check_grad_filter",
    "BackendUnavailable",
    "resolve_backend",
    "filtered_rows",
    "FilterReport",
]
