"""fastsoft: soft prompts learned by context compression, with fused softmax-KL kernels."""

__version__ = "0.1.0"

from fastsoft.api import compress
from fastsoft.config import CompressConfig
from fastsoft.data.jobs import Job, read_jobs
from fastsoft.errors import FastsoftError
from fastsoft.eval.generate import generate
from fastsoft.frozen.loading import load_model
from fastsoft.io.export import load_prompt, save_prompt
from fastsoft.ops import HiddenTarget, SparseTarget, softmax_kl

__all__ = [
    "compress",
    "CompressConfig",
    "FastsoftError",
    "Job",
    "read_jobs",
    "load_model",
    "load_prompt",
    "save_prompt",
    "generate",
    "softmax_kl",
    "SparseTarget",
    "HiddenTarget",
]
