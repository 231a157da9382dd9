"""The device name the benchmarks print and file their results under (``benchmarks/results/<op>-<device>.json``)."""

from __future__ import annotations

import os
import platform

import torch


def device_name(device_type: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the core count (``AMD EPYC x2``)."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
        name = f"{model} x{os.cpu_count()}" if model else name
    except OSError:
        pass
    return name
