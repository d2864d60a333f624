"""Quantized prefix codes: the first stage of Matryoshka search at a million chunks.

A chunk's code is its rotated, centred prefix ``(v - mean) @ R[:, :d]`` (see dense_index) quantized to
int8 with one symmetric scale per coordinate (the coordinate's 99.9th percentile of |x|; the rare larger
values saturate at +-127). A query scores every code with an int8 dot product against its own prefix
scaled the same way, which estimates the prefix's contribution to the full dot product; the best
``k`` rows go on to the exact full-dimension rerank. Binary sign codes (one bit per coordinate, matching
bits as the score) are 8x smaller but lose too much: on 100k vectors sampled like MiniLM's, PCA-rotated,
a 256-bit code's shortlist of 4,000 holds 34% of the exact top 10, where a 64-d int8 code's shortlist of
1,000 holds 99.75% (the low-variance coordinates' signs are noise that counts as much as the leading
ones'); they stay available as ``kind="bits"``.

The scan, the top-k selection and the float16 rerank run in the native library
(kernels/native/shortlist.c): one pass over the codes at memory speed, a histogram selection, and F16C
dot products of the shortlisted rows. numpy is the fallback when the library is not built; it gives the
same rows (ties aside) at many times the cost, since each step there is its own pass over memory with a
temporary (at 100k codes: 0.5 ms native, tens of ms in numpy).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ripelm.kernels import native_lib

KINDS = ("int8", "bits")
PERCENTILE = 99.9
_SAMPLE = 200_000  # rows the per-coordinate scales are measured on at most


def _lib():
    lib = native_lib.load()
    if lib is None or not hasattr(lib, "rl_shortlist"):
        return None
    f = lib.rl_shortlist
    if f.argtypes is None:
        i64 = ctypes.c_int64
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, i64, ctypes.c_int, ctypes.c_void_p, i64]
        f.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
        f.restype = i64
        g = lib.rl_f16_dots
        g.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, i64, ctypes.c_void_p, ctypes.c_void_p]
        g.restype = None
    return lib


def f16_dots(full: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float32 dot products of float16 rows ``full[rows]`` with ``q``, reading only those rows."""
    lib = _lib()
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if lib is None or full.dtype != np.float16 or not full.flags.c_contiguous or full.ndim != 2:
        return np.asarray(full[rows], dtype=np.float32) @ q
    qf = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty(len(rows), dtype=np.float32)
    lib.rl_f16_dots(
        full.ctypes.data, full.shape[1], rows.ctypes.data, len(rows), qf.ctypes.data, out.ctypes.data
    )
    return out


def code_bytes(kind: str, d: int) -> int:
    return d if kind == "int8" else d // 8


def fit_scale(prefix: np.ndarray, seed: int = 0) -> np.ndarray:
    """(d,) float32 per-coordinate scale for int8 codes."""
    x = prefix
    if len(x) > _SAMPLE:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), _SAMPLE, replace=False))]
    s = np.percentile(np.abs(np.asarray(x, dtype=np.float32)), PERCENTILE, axis=0)
    return np.maximum(s, 1e-6).astype(np.float32)


def encode(prefix: np.ndarray, kind: str, scale: np.ndarray | None) -> np.ndarray:
    """(n, code_bytes) uint8/int8 codes of rotated, centred prefixes (n, d)."""
    x = np.asarray(prefix, dtype=np.float32)
    if kind == "int8":
        return np.clip(np.rint(x * (127.0 / scale)), -127, 127).astype(np.int8)
    if kind == "bits":
        if x.shape[1] % 64:
            raise ValueError("binary codes need a prefix length that is a multiple of 64")
        return np.packbits(x > 0, axis=1, bitorder="little")
    raise ValueError(f"unknown code kind '{kind}'")


@dataclass
class PrefixCodes:
    kind: str
    d: int
    codes: np.ndarray  # (n, code_bytes), may be a read-only memory map
    scale: np.ndarray | None  # (d,) for int8

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes)

    def query_code(self, q_prefix: np.ndarray) -> np.ndarray:
        q = np.asarray(q_prefix, dtype=np.float32)[: self.d]
        if self.kind == "bits":
            return np.packbits(q > 0, bitorder="little")
        # the query's own coordinates times the documents' scale: code . qc ~ prefix(v) . prefix(q)
        w = q * self.scale
        return np.clip(np.rint(w * (127.0 / max(float(np.abs(w).max()), 1e-12))), -127, 127).astype(np.int8)

    def shortlist(self, q_prefix: np.ndarray, k: int, *, native: bool = True) -> np.ndarray:
        """Row numbers of the (about) k best codes for a query prefix, unordered."""
        n = len(self)
        k = min(k, n)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        qc = np.ascontiguousarray(self.query_code(q_prefix))
        lib = _lib() if native else None
        if lib is not None and self.codes.flags.c_contiguous:
            scratch = np.empty(n, dtype=np.int32)
            out = np.empty(k, dtype=np.int64)
            width = self.d if self.kind == "int8" else self.d // 64
            got = lib.rl_shortlist(
                0 if self.kind == "bits" else 1,
                self.codes.ctypes.data,
                n,
                width,
                qc.ctypes.data,
                k,
                scratch.ctypes.data,
                out.ctypes.data,
            )
            if got >= 0:
                return out[:got]
        return self._shortlist_numpy(qc, k)

    def _shortlist_numpy(self, qc: np.ndarray, k: int) -> np.ndarray:
        scores = np.empty(len(self), dtype=np.int32)
        for s in range(0, len(self), 65536):
            block = self.codes[s : s + 65536]
            if self.kind == "int8":
                # float32 sums of int8 products are exact here (|sum| <= 512 * 127 * 127 < 2 ** 24)
                scores[s : s + 65536] = block.astype(np.float32) @ qc.astype(np.float32)
            else:
                x = np.bitwise_xor(block.view(np.uint64), qc.view(np.uint64))
                scores[s : s + 65536] = self.d - np.bitwise_count(x).sum(axis=1, dtype=np.int32)
        if k >= len(scores):
            return np.arange(len(scores))
        return np.argpartition(-scores, k - 1)[:k]
