"""4-bit weights on CUDA: a Triton GEMV/GEMM for up to 16 activation rows, and a dequantizer for prefill.

Why our own: torch's int4 kernel (tinygemm) rounds scale and zero to bfloat16, which put the GPU's logits
1.13e-3 (mean KL) from the CPU path's, and it reached about 13% of an H200's bandwidth (Llama-2-7B-shaped
Q4_0: 160 tok/s in CUDA graphs). A weight here is exactly `scale * code + offset` per group of `group`
inputs (every GGUF 4-bit type: Q4_0, Q4_1, Q4_K, as in `Int4Linear`), scale and offset in float16.

Layout (made once at load by `prepare`, for coalesced loads): the codes of a tile of `pk` inputs (128 or
256) sit in pk / 8 int32 words per output column; word r of tile t holds the codes of inputs
t*pk + i*(pk/8) + r for i = 0..7 in bits 4i..4i+3. Words are stored [K / 8, N] (outputs contiguous, so a
warp reads consecutive columns), scale and offset [K / group, N]. Unpacking nibble i of a tile's words
gives the codes of one contiguous run of pk / 8 inputs that lies in a single group, so each run needs one
row of scales and one contiguous slice of x: only 2-D tiles, no gathers.

Two ways through a tile, both exact in the products (activations rounded to bfloat16 first, as tinygemm
and the CPU path do; codes 0..15 are exact in any float type) with float32 sums:
- `dot`: tensor cores, tl.dot(x [16, run] bf16, codes [run, BN] bf16) per run, then
  `acc += part * scale + rowsum(x) * offset` (rows padded to 16); for 2..16 rows, and one row too.
- `fma`: one row only, CUDA cores; codes become floats by the exponent trick (code | 0x4B000000 read as a
  float is 2^23 + code) instead of an int-to-float conversion, `acc += (q * scale + offset) * x`
  elementwise, one reduction at the end.
Split-K (when there are too few column tiles to fill the GPU) writes float32 partial sums [splits, M, N]
that one torch sum adds: deterministic, no atomics.

Configurations (path, BLOCK_N, warps, splits) are tuned once per (one row or more, N, K) on the GPU at
first use (median of 15 timed runs with a cold L2 per candidate, outside graph capture; off with
RIPELM_CUDA_INT4_TUNE=0, then the heuristic below). RIPELM_CUDA_INT4_LOG=1 prints each choice with its
time and bandwidth to stderr.

Which kernel decodes is `RIPELM_CUDA_INT4=triton|tinygemm` (default tinygemm until the H200 measurement
says otherwise). Prefill (more than MAX_ROWS rows) on CUDA dequantizes the weight to bfloat16 [K, N]
(`dequantize_t`) and runs cuBLAS, whichever kernel decodes. Runs under Triton's interpreter on the CPU
for the tests (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

MAX_ROWS = 16


def mode() -> str:
    m = os.environ.get("RIPELM_CUDA_INT4", "tinygemm")
    return m if m in ("triton", "tinygemm") else "tinygemm"


def available() -> bool:
    return triton is not None


def enabled() -> bool:
    """Decode through the Triton kernel (RIPELM_CUDA_INT4=triton)."""
    return available() and mode() == "triton"


def tile_for(k: int, group: int) -> int | None:
    """The input tile (pk) a row of k inputs packs in, or None if this layout does not fit it."""
    for pk in (256, 128):
        if k % pk == 0 and group % (pk // 8) == 0:
            return pk
    return None


@dataclass
class Q4Weight:
    words: torch.Tensor  # int32 [K / 8, N]
    scale: torch.Tensor  # float16 [K / group, N]
    offset: torch.Tensor  # float16 [K / group, N]
    group: int
    pk: int

    def to(self, device: torch.device | str) -> Q4Weight:
        return Q4Weight(
            self.words.to(device), self.scale.to(device), self.offset.to(device), self.group, self.pk
        )

    @property
    def n(self) -> int:
        return self.words.shape[1]

    @property
    def k(self) -> int:
        return self.words.shape[0] * 8


def pack(codes: torch.Tensor, pk: int) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> int32 words [K / 8, N] in the tile layout above."""
    n, k = codes.shape
    sb = pk // 8
    c = codes.to(torch.int64).view(n, k // pk, 8, sb)  # (n, tile, i, r): input tile*pk + i*sb + r
    w = torch.zeros(n, k // pk, sb, dtype=torch.int64, device=codes.device)
    for i in range(8):
        w |= c[:, :, i, :] << (4 * i)
    w = torch.where(w >= 1 << 31, w - (1 << 32), w)  # two's complement int32
    return w.to(torch.int32).reshape(n, k // 8).t().contiguous()


def prepare(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> Q4Weight:
    """The layout above from codes [N, K] and float scale/offset [N, K // group], on the codes' device
    (pass them on the GPU: packing a 7B model there takes a moment, on the CPU many seconds)."""
    pk = tile_for(codes.shape[1], group)
    if pk is None:
        raise ValueError(f"a row of {codes.shape[1]} in groups of {group} does not fit the Triton layout")
    return Q4Weight(
        pack(codes, pk),
        scale.to(codes.device, torch.float16).t().contiguous(),
        offset.to(codes.device, torch.float16).t().contiguous(),
        group,
        pk,
    )


if triton is not None:

    @triton.jit
    def _q4_mm(
        x_ptr,  # [M, K] activations, any float dtype, row stride stride_x
        w_ptr,  # int32 [K / 8, N]
        s_ptr,  # float16 [K / G, N]
        o_ptr,  # float16 [K / G, N]
        y_ptr,  # float32 [splits, M, N]
        M,
        N,
        stride_x,
        n_tiles,
        tiles_per_split,
        G: tl.constexpr,
        PK: tl.constexpr,
        BN: tl.constexpr,
        DOT: tl.constexpr,
    ):
        SB: tl.constexpr = PK // 8
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = pid_n * BN + tl.arange(0, BN)
        nm = n < N
        r = tl.arange(0, SB)
        t0 = pid_s * tiles_per_split
        m = tl.arange(0, 16)
        mm = m < M
        if DOT:
            acc = tl.zeros([16, BN], tl.float32)
        else:
            acc = tl.zeros([SB, BN], tl.float32)
        for j in range(tiles_per_split):  # the last split may run past K: masked to zeros
            t = t0 + j
            live = t < n_tiles
            cm = nm & live
            words = tl.load(w_ptr + (t * SB + r)[:, None] * N + n[None, :], mask=cm[None, :], other=0)
            for i in tl.static_range(8):
                k = t * PK + i * SB
                g = k // G
                s = tl.load(s_ptr + g * N + n, mask=cm, other=0.0).to(tl.float32)
                o = tl.load(o_ptr + g * N + n, mask=cm, other=0.0).to(tl.float32)
                q = ((words >> (4 * i)) & 15) | 0x4B000000
                qf = q.to(tl.float32, bitcast=True) - 8388608.0  # the code, exactly
                if DOT:
                    xp = x_ptr + m[:, None] * stride_x + (k + r)[None, :]
                    xi = tl.load(xp, mask=mm[:, None] & live, other=0.0).to(tl.bfloat16)
                    part = tl.dot(xi, qf.to(tl.bfloat16))  # [16, BN], exact products, float32 sums
                    xs = tl.sum(xi.to(tl.float32), 1)
                    acc += part * s[None, :] + xs[:, None] * o[None, :]
                else:
                    xi = tl.load(x_ptr + k + r, mask=(r < SB) & live, other=0.0)
                    xi = xi.to(tl.bfloat16).to(tl.float32)
                    acc += (qf * s[None, :] + o[None, :]) * xi[:, None]
        out = y_ptr + pid_s * M * N
        if DOT:
            tl.store(out + m[:, None] * N + n[None, :], acc, mask=mm[:, None] & nm[None, :])
        else:
            tl.store(out + n, tl.sum(acc, 0), mask=nm)

    @triton.jit
    def _q4_dequant_t(w_ptr, s_ptr, o_ptr, out_ptr, N, G: tl.constexpr, PK: tl.constexpr, BN: tl.constexpr):
        SB: tl.constexpr = PK // 8
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        nm = n < N
        t = tl.program_id(1)
        r = tl.arange(0, SB)
        words = tl.load(w_ptr + (t * SB + r)[:, None] * N + n[None, :], mask=nm[None, :], other=0)
        for i in tl.static_range(8):
            k = t * PK + i * SB
            s = tl.load(s_ptr + (k // G) * N + n, mask=nm, other=0.0).to(tl.float32)
            o = tl.load(o_ptr + (k // G) * N + n, mask=nm, other=0.0).to(tl.float32)
            q = (((words >> (4 * i)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            w = q * s[None, :] + o[None, :]
            dst = out_ptr + (k + r)[:, None] * N + n[None, :]
            tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=nm[None, :])


@dataclass(frozen=True)
class Config:
    dot: bool
    bn: int
    warps: int
    splits: int


_CHOICE: dict[tuple, Config] = {}


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(n: int, bn: int, n_tiles: int, sms: int) -> int:
    """Enough programs for about four per SM, each with at least two tiles of K."""
    cols = -(-n // bn)
    want = max(1, -(-4 * sms // cols))
    return max(1, min(want, n_tiles // 2, 16))


def heuristic(rows: int, w: Q4Weight, sms: int) -> Config:
    n_tiles = w.k // w.pk
    if rows == 1:
        return Config(False, 128, 4, _splits(w.n, 128, n_tiles, sms))
    return Config(True, 64, 4, _splits(w.n, 64, n_tiles, sms))


def _candidates(rows: int, w: Q4Weight, sms: int) -> list[Config]:
    n_tiles = w.k // w.pk
    shapes = [(True, 32, 4), (True, 64, 4), (True, 128, 4), (True, 128, 8)]
    if rows == 1:
        shapes = [(False, 64, 4), (False, 128, 4), (False, 256, 8), (True, 64, 4), (True, 128, 4)]
    out = []
    for dot, bn, warps in shapes:
        s = _splits(w.n, bn, n_tiles, sms)
        for sp in sorted({s, max(1, s // 2), min(2 * s, max(1, n_tiles // 2))}):
            out.append(Config(dot, bn, warps, sp))
    return out


def _launch(x: torch.Tensor, w: Q4Weight, cfg: Config) -> torch.Tensor:
    m = x.shape[0]
    n_tiles = w.k // w.pk
    per = -(-n_tiles // cfg.splits)
    splits = -(-n_tiles // per)
    y = torch.empty(splits, m, w.n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(w.n, cfg.bn), splits)
    _q4_mm[grid](
        x, w.words, w.scale, w.offset, y, m, w.n, x.stride(0), n_tiles, per,
        G=w.group, PK=w.pk, BN=cfg.bn, DOT=cfg.dot, num_warps=cfg.warps,
    )  # fmt: skip
    return y[0] if splits == 1 else y.sum(0)


def _time(fn, flush: torch.Tensor, reps: int = 15) -> float:  # noqa: ANN001 - a kernel launch
    """Median GPU milliseconds of fn with a cold L2 (the flush queued first, so the launch overhead hides
    behind it and the events time the kernel alone)."""
    fn()  # compiles
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in ev:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ev)[reps // 2]


def _tune(x: torch.Tensor, w: Q4Weight, key: tuple) -> Config:
    sms = _sms(x.device)
    rows = x.shape[0]
    if (
        x.device.type != "cuda"
        or os.environ.get("RIPELM_CUDA_INT4_TUNE", "1") == "0"
        or torch.cuda.is_current_stream_capturing()
    ):
        return heuristic(rows, w, sms)
    flush = torch.empty(64 << 20, dtype=torch.int32, device=x.device)  # 256 MB: more than any L2
    best, best_t = heuristic(rows, w, sms), float("inf")
    for cfg in _candidates(rows, w, sms):
        try:
            t = _time(lambda c=cfg: _launch(x, w, c), flush)
        except Exception as exc:  # a configuration that does not compile here is skipped
            print(f"ripe: int4 config {cfg} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if t < best_t:
            best, best_t = cfg, t
    if os.environ.get("RIPELM_CUDA_INT4_LOG") == "1":
        nbytes = w.words.numel() * 4 + w.scale.numel() * 4
        print(
            f"ripe: int4 rows={'1' if key[0] == 1 else '2-16'} N={w.n} K={w.k} -> {best} "
            f"{best_t * 1e3:.1f} us "
            f"{nbytes / best_t / 1e6:.0f} GB/s",
            file=sys.stderr,
        )
    return best


def matmul(x: torch.Tensor, w: Q4Weight) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ W^T -> float32 [M, N]."""
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"the 4-bit matmul takes at most {MAX_ROWS} rows, not {m}")
    if k != w.k:
        raise ValueError(f"input of {k} for a weight of {w.k} inputs")
    if x.stride(1) != 1:
        x = x.contiguous()
    key = (1 if m == 1 else 2, w.n, w.k, w.group, w.pk, x.device.index)
    cfg = _CHOICE.get(key)
    if cfg is None:
        cfg = _CHOICE[key] = _tune(x, w, key)
    return _launch(x, w, cfg)


def dequantize_t(w: Q4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The transposed weight W^T [K, N] in `dtype` (float32 arithmetic, one rounding)."""
    out = torch.empty(w.k, w.n, dtype=dtype, device=w.words.device)
    _q4_dequant_t[(triton.cdiv(w.n, 64), w.k // w.pk)](
        w.words, w.scale, w.offset, out, w.n, G=w.group, PK=w.pk, BN=64
    )
    return out
