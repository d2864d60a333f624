"""Which device and dtype the native engine computes on: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from ripelm.runtime.errors import BackendError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(requested: str | None = None) -> torch.device:
    req = (requested or os.environ.get("RIPELM_DEVICE") or "auto").lower()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = req.split(":")[0]
    if kind not in DEVICES:
        raise BackendError(f"unknown device '{requested}' (choose from {', '.join(DEVICES)})")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda requested but this torch build sees no CUDA GPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BackendError("--device mps requested but Metal (MPS) is not available here")
    return torch.device(req)


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 activations: CPU int4 matmul and AMX/AVX512-BF16 take them natively; MPS int4 matmul wants fp16
    # or bf16 and fp16 is the safer choice across macOS versions.
    return torch.float16 if device.type == "mps" else torch.bfloat16


def set_threads(n: int | None) -> None:
    """Use `n` CPU threads (default: what torch chose, normally the physical cores)."""
    if n:
        torch.set_num_threads(n)


def release_free_memory() -> None:
    """Hand memory freed after loading (hundreds of MB of unpacking temporaries) back to the OS.

    glibc keeps freed heap pages mapped; without this, peak-sized RSS lingers for the life of the process.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl...): nothing to do
            pass


def bound_heap_growth() -> None:
    """Serve allocations of 4 MB and up straight from mmap, so they go back to the OS when freed.

    glibc otherwise raises its mmap threshold after the first large free, and prefill temporaries (dense
    weights, activations) then pile up in the heap: measured 740-790 MB peak RSS instead of 545 MB on
    the bundled model, with the same speed.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
