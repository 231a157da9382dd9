"""Loss ops. ``softmax_kl`` is the one entry point every objective goes through."""

from fastsoft.ops.softmax_kl import BackendUnavailable, SoftmaxKLLoss, resolve_backend, softmax_kl
from fastsoft.ops.targets import HiddenTarget, SparseTarget

__all__ = ["softmax_kl", "SoftmaxKLLoss", "SparseTarget", "HiddenTarget", "BackendUnavailable", "resolve_backend"]
