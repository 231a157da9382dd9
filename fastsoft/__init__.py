"""fastsoft: soft prompts learned by context compression, with fused softmax-KL kernels."""

__version__ = "0.1.0"
