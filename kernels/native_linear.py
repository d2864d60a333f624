"""torch modules over weights held only in the native library's repacked layout (kernels/native/repack.c).

When the native decode step runs a model, its repacked int4/int8 blocks are the one copy of the weights
in memory: decode reads them in C, and the torch path (prefill chunks of 32 rows and more) dequantizes a
layer's weights from them on the fly, as it did from the file before. So neither torch's packed int4
copy nor the model file stays resident.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ripelm.kernels.cpu_features import dense_matmul_dtype


@dataclass
class Repacked:
    """One matrix in the repacked layout: `fmt` (native_lib.FMT_Q4/Q5/Q6/Q8), [n, k], its bytes."""

    fmt: int
    n: int
    k: int
    data: np.ndarray

    def dequantize(self, lib: ctypes.CDLL, threads: int, out: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.empty(self.n, self.k, dtype=torch.float32) if out is None else out
        if lib.rl_dequant(threads, self.fmt, self.data.ctypes.data, self.n, self.k, w.data_ptr()) != 0:
            raise MemoryError("native dequantization: no thread pool")
        return w

    def rows(self, lib: ctypes.CDLL, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows `ids` (dequantized exactly)."""
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(ids.numel(), self.k, dtype=torch.float32)
        lib.rl_gather_rows(
            self.fmt, self.data.ctypes.data, self.k, ids.data_ptr(), ids.numel(), out.data_ptr()
        )
        return out


class RepackedLinear(nn.Module):
    """y = x @ W^T (+ b) for many rows, W the outputs of `parts` side by side, dequantized per call."""

    def __init__(
        self, lib: ctypes.CDLL, parts: list[Repacked], bias: torch.Tensor | None, dtype: torch.dtype
    ):
        super().__init__()
        self.lib, self.parts = lib, parts
        self.in_features = parts[0].k
        self.out_features = sum(p.n for p in parts)
        self.dtype = dtype
        self.bias = None if bias is None else bias.float()

    def weight(self) -> torch.Tensor:
        threads = torch.get_num_threads()
        if len(self.parts) == 1:
            return self.parts[0].dequantize(self.lib, threads)
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
        row = 0
        for p in self.parts:
            p.dequantize(self.lib, threads, w[row : row + p.n])
            row += p.n
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = dense_matmul_dtype(self.dtype)
        y = F.linear(x.to(dt), self.weight().to(dt))
        return y.float() if self.bias is None else y.float() + self.bias


class RepackedEmbedding(nn.Module):
    """Token embedding rows dequantized from a repacked matrix (the tied head, or token_embd itself)."""

    def __init__(self, lib: ctypes.CDLL, table: Repacked):
        super().__init__()
        self.lib, self.table = lib, table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(self.lib, tokens.cpu())
