"""Which device and dtype the native engine computes on: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import os

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
