"""What the CPU can do fast, for choosing between kernels at run time."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AMX-BF16 or AVX512-BF16).

    Elsewhere torch emulates bf16 and a bf16 matmul is ~8x slower than fp32 (Zen 3, 2 threads, [512, 576]
    x [576, 1536]: 16 against 127 GFLOP/s).
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # ARM64: bf16 since ARMv8.6 (Apple M2+); untested here, kept as before
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "avx512_bf16" in flags or "amx_bf16" in flags
    return True


def dense_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for a large CPU matmul whose activations are `dtype`: fp32 instead of emulated bf16."""
    return torch.float32 if dtype == torch.bfloat16 and not cpu_has_bf16_matmul() else dtype
