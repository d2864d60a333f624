"""torch modules over weights held only in the native library's repacked layout (kernels/native/repack.c).

When the native decode step runs a model, its repacked int4/int8/ternary blocks are the one copy of the
weights in memory: decode reads them in C, and the torch path (prefill chunks of 32 rows and more)
dequantizes a layer's weights from them on the fly, as it did from the file before (the embedding and the
output head read them in C). So neither torch's packed int4 copy nor the model file stays resident.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ripelm.kernels.cpu_features import dense_matmul_dtype

HUGE_PAGE = 2 << 20


class WeightArena:
    """Anonymous memory for repacked weights, advised for transparent huge pages.

    Decode streams every weight once per token; on 4 KiB pages that is one TLB miss per page and, in a
    VM, a two-level page walk each. Weights carved out of a few large mappings advised MADV_HUGEPAGE
    (honored where the kernel's THP mode is `madvise` or `always`) take 2 MiB pages instead. Slices
    are handed out in order from chunks of `chunk` bytes; untouched space at a chunk's end costs
    address space only.
    """

    def __init__(self, chunk: int = 32 << 20):
        self.chunk = chunk
        self._buf: np.ndarray | None = None
        self._at = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A fresh uint8 array of nbytes, 64-byte aligned."""
        nbytes = int(nbytes)
        if self._buf is None or self._at + nbytes > self._buf.size:
            size = max(self.chunk, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    m.madvise(mmap.MADV_HUGEPAGE)
                except OSError:  # THP compiled out: plain pages
                    pass
            self._buf, self._at = np.frombuffer(m, dtype=np.uint8), 0
        out = self._buf[self._at : self._at + nbytes]
        self._at += -(-nbytes // 64) * 64
        return out


@dataclass
class Repacked:
    """One matrix in the repacked layout: `fmt` (a native_lib.FMT_* layout), [n, k], its bytes."""

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


class RepackedHead(nn.Module):
    """The output head on the native library, for the torch path's logits (the last rows of a prefill).
    `weights`: a runtime.native_decode.NativeWeights (its lib, isa, cfg and repacked head)."""

    def __init__(self, weights) -> None:  # noqa: ANN001 - NativeWeights (runtime imports this module)
        super().__init__()
        self.lib, self.head = weights.lib, weights.head
        cfg = weights.cfg
        self.vocab = cfg.vocab_size
        one = np.ones(1, dtype=np.float32)
        handle = self.lib.rl_model_new(1, cfg.hidden, 1, 1, 8, cfg.ffn, 0, 0, 1e-6, 1.0, one.ctypes.data)
        if not handle:
            raise MemoryError("native head: out of memory")
        self.handle = handle
        self.lib.rl_model_set_isa(handle, weights.isa)
        self.lib.rl_model_set_head(handle, None, self.head.fmt, self.vocab, self.head.data.ctypes.data)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float().contiguous()
        rows = h.shape[0]
        logits = torch.empty(rows, (self.vocab + 7) // 8 * 8, dtype=torch.float32)  # whole 8-row groups
        if self.lib.rl_head(self.handle, torch.get_num_threads(), rows, h.data_ptr(), logits.data_ptr()) != 0:
            raise MemoryError("native head: out of memory for its buffers")
        return logits[:, : self.vocab]

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.lib.rl_model_free(self.handle)
            self.handle = None
