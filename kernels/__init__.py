"""Triton kernels, installed as ``fastsoft.kernels``."""
