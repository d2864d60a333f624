"""4-bit weights on CUDA: a Triton matmul for up to 16 activation rows, and a dequantizer for prefill.

Opt-in (`RIPELM_CUDA_INT4=triton`; the default is torch's int4 kernel, tinygemm). Why it exists: tinygemm
dequantizes to bfloat16 (8-bit mantissa), which put the GPU's logits 1.13e-3 (mean KL, 300 positions of the
bundled model) from the CPU path's, and it reaches about 13% of an H200's bandwidth (Llama-2-7B-shaped Q4_0:
160 tok/s inside CUDA graphs). Here a weight is `scale * code + offset` per group of `group` inputs (every
GGUF 4-bit type, as in `Int4Linear`): codes two per byte (even input in the low nibble, odd in the high),
scale and offset in float16. A program computes a tile of outputs for all rows: it dequantizes a tile of
weights in float32, rounds it to float16 (11-bit mantissa), scales each row's activation tile by its largest
magnitude so that float16 can hold it, and multiplies on the tensor cores with float32 accumulation.

Measured on the H200 as first written: KL to the CPU path 7.5e-4 and argmax agreement 99.7% (tinygemm:
1.13e-3, 98.7%), but 17 tok/s at one row on the 7B shape, 9x slower than tinygemm: each program walks K
in one dependent sequence of small tiles and loads scale and offset per element. Tuning (split-K, scale
loads per group, larger tiles) needs a GPU session; until it is faster it is not the default.

Prefill (more than `MAX_ROWS` rows) dequantizes the weight to the activation dtype once per call and runs
cuBLAS (`dequantize`). Runs under Triton's interpreter on the CPU for the tests.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

MAX_ROWS = 16


def enabled() -> bool:
    """The Triton 4-bit path on CUDA when RIPELM_CUDA_INT4=triton."""
    return triton is not None and os.environ.get("RIPELM_CUDA_INT4", "tinygemm") == "triton"


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> [N, K // 2], input 2j in the low nibble of byte j, 2j + 1 in the high."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()


if triton is not None:

    @triton.jit
    def _q4_mm(
        x_ptr,  # [M, K] activations (any float dtype), row stride stride_x
        w_ptr,  # [N, K // 2] uint8
        s_ptr,  # [N, K // GROUP, 2] float16: scale, offset
        y_ptr,  # [M, N] float32
        M,
        N,
        stride_x,
        K: tl.constexpr,
        GROUP: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        MP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid * BN + tl.arange(0, BN)
        nm = n < N
        m = tl.arange(0, MP)
        mm = m < M
        j = tl.arange(0, BK // 2)  # byte within the tile: inputs 2j and 2j + 1
        acc = tl.zeros([MP, BN], tl.float32)
        for k0 in range(0, K, BK):
            byte = tl.load(w_ptr + n[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=nm[:, None], other=0)
            g = (k0 + 2 * j) // GROUP
            sz = s_ptr + (n[:, None] * (K // GROUP) + g[None, :]) * 2
            scale = tl.load(sz, mask=nm[:, None], other=0.0).to(tl.float32)
            off = tl.load(sz + 1, mask=nm[:, None], other=0.0).to(tl.float32)
            w_lo = ((byte & 15).to(tl.float32) * scale + off).to(tl.float16)  # [BN, BK / 2]
            w_hi = ((byte >> 4).to(tl.float32) * scale + off).to(tl.float16)
            xe = tl.load(x_ptr + m[:, None] * stride_x + (k0 + 2 * j)[None, :], mask=mm[:, None], other=0.0)
            xo = tl.load(
                x_ptr + m[:, None] * stride_x + (k0 + 2 * j + 1)[None, :], mask=mm[:, None], other=0.0
            )
            xe = xe.to(tl.float32)
            xo = xo.to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(xe), 1), tl.max(tl.abs(xo), 1))
            amax = tl.where(amax > 0, amax, 1.0)
            inv = 1.0 / amax
            part = tl.dot((xe * inv[:, None]).to(tl.float16), tl.trans(w_lo))
            part += tl.dot((xo * inv[:, None]).to(tl.float16), tl.trans(w_hi))
            acc += part * amax[:, None]
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc, mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _q4_dequant(
        w_ptr, s_ptr, out_ptr, N, K: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
    ):
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        n = pn * BN + tl.arange(0, BN)
        nm = n < N
        j = pk * (BK // 2) + tl.arange(0, BK // 2)
        byte = tl.load(w_ptr + n[:, None] * (K // 2) + j[None, :], mask=nm[:, None], other=0)
        sz = s_ptr + (n[:, None] * (K // GROUP) + ((2 * j) // GROUP)[None, :]) * 2
        scale = tl.load(sz, mask=nm[:, None], other=0.0).to(tl.float32)
        off = tl.load(sz + 1, mask=nm[:, None], other=0.0).to(tl.float32)
        lo = (byte & 15).to(tl.float32) * scale + off
        hi = (byte >> 4).to(tl.float32) * scale + off
        base = out_ptr + n[:, None] * K + (2 * j)[None, :]
        tl.store(base, lo.to(out_ptr.dtype.element_ty), mask=nm[:, None])
        tl.store(base + 1, hi.to(out_ptr.dtype.element_ty), mask=nm[:, None])


def _block_n(n: int) -> int:
    return 16 if n <= 4096 else 32


def matmul(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ W^T -> float32 [M, N]; W given by `pack`ed codes [N, K // 2] and
    float16 `sz` [N, K // group, 2] (scale, offset)."""
    m, k = x.shape
    n = packed.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"the 4-bit matmul takes at most {MAX_ROWS} rows, not {m}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    bn = _block_n(n)
    bk = 256 if k % 256 == 0 else (128 if k % 128 == 0 else 64)
    _q4_mm[(triton.cdiv(n, bn),)](
        x, packed, sz, y, m, n, x.stride(0), K=k, GROUP=group, BN=bn, BK=bk, MP=MAX_ROWS
    )
    return y


def dequantize(packed: torch.Tensor, sz: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype` (float32 arithmetic, one rounding)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    bk = 256 if k % 256 == 0 else (128 if k % 128 == 0 else 64)
    _q4_dequant[(triton.cdiv(n, 32), k // bk)](packed, sz, out, n, K=k, GROUP=group, BN=32, BK=bk)
    return out
