"""Paged decode attention on CUDA: one Triton kernel per layer, split over the history (flash-decoding).

Ours rather than a library's: it reads our pool layout (`[blocks, block_size, kv_heads, head_dim]` per
layer, see `runtime.kv_cache`) through our block tables, and it must have static launch shapes so that a
whole decode step can be captured in a CUDA graph (`runtime.cuda_step`). One program handles one
(sequence, K/V head, split): it loads the G query heads that share the K/V head (GQA: each K/V row is
read once for all of them), walks its share of the history in tiles of BLOCK_N keys with an online softmax
in float32, and writes an unnormalized partial (max, sum of exponentials, weighted sum of values).
`merge_splits` combines the splits. A sequence's share of the history is computed from its own length
on the device, so a short history is spread over all splits as evenly as a long one.

Runs wherever Triton runs: on a CUDA GPU, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`),
which is how the tests check it on a machine without a GPU when Triton is installed.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; CUDA builds of torch ship it
    triton = None
    tl = None

BLOCK_N = 64  # keys per tile
MIN_ROWS = 16  # tl.dot's smallest M: the query heads of a group are padded to this


def available() -> bool:
    return triton is not None


def splits_for(batch: int, kv_heads: int, max_len: int, sms: int = 132) -> int:
    """Splits per (sequence, K/V head): enough programs to fill the GPU twice over, none emptier than a
    tile at the longest history."""
    want = -(-2 * sms // max(1, batch * kv_heads))
    return max(1, min(want, 32, -(-max_len // BLOCK_N)))


if triton is not None:

    @triton.jit
    def _decode_part(
        q_ptr,  # [B, H, D]
        k_ptr,  # [slots, KV, D] (one layer's pool, flat)
        v_ptr,
        tables_ptr,  # [B, table_stride] int64 block ids
        lens_ptr,  # [B] int64 keys each sequence sees
        m_ptr,  # [B, H, S] float32
        l_ptr,  # [B, H, S] float32
        acc_ptr,  # [B, H, S, D] float32
        scale,
        table_stride,
        KV: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        G_PAD: tl.constexpr,
        BS: tl.constexpr,
        S: tl.constexpr,
        BN: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        n = tl.load(lens_ptr + b)
        per = tl.cdiv(tl.cdiv(n, S), BN) * BN
        start = s * per
        end = tl.minimum(start + per, n)
        g = tl.arange(0, G_PAD)
        dd = tl.arange(0, D_PAD)
        gm = g < G
        dm = dd < D
        heads = h * G + g  # the query heads of K/V head h
        q = tl.load(
            q_ptr + (b * (KV * G) + heads[:, None]) * D + dd[None, :],
            mask=gm[:, None] & dm[None, :],
            other=0.0,
        ).to(tl.float32)
        q = q * scale
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        t0 = start
        while t0 < end:  # a while loop, not range(): Triton's interpreter cannot index with its scalars
            t = t0 + tl.arange(0, BN)
            tm = t < end
            blk = tl.load(tables_ptr + b * table_stride + t // BS, mask=tm, other=0)
            row = (blk * BS + t % BS) * KV + h
            kv_mask = tm[:, None] & dm[None, :]
            k = tl.load(k_ptr + row[:, None] * D + dd[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [G_PAD, BN]
            scores = tl.where(tm[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + row[:, None] * D + dd[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
            t0 += BN
        out = (b * (KV * G) + heads) * S + s
        tl.store(m_ptr + out, m_i, mask=gm)
        tl.store(l_ptr + out, l_i, mask=gm)
        tl.store(acc_ptr + out[:, None] * D + dd[None, :], acc, mask=gm[:, None] & dm[None, :])


def merge_splits(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """[B, H, S], [B, H, S], [B, H, S, D] partials -> [B, H, D] float32. A split that saw no keys has
    m = -inf and weighs nothing; every sequence has at least one key, so some split has a finite m."""
    top = m.amax(-1, keepdim=True)
    w = torch.exp(m - top)
    return (acc * w[..., None]).sum(2) / (l * w).sum(-1)[..., None]


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    splits: int,
    work: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query row per sequence: q [B, H, D] over each sequence's first lens[b] keys, found through
    tables [B, W] (int64 block ids) in one layer's pools [blocks, bs, KV, D]. Returns [B, H, D] in q's
    dtype. `work` holds preallocated partials (m, l, acc) of `splits` splits, for graph capture."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    bsz, h, d = q.shape
    _, bs, kv, _ = k_pool.shape
    g = h // kv
    if work is None:
        work = (
            q.new_empty(bsz, h, splits, dtype=torch.float32),
            q.new_empty(bsz, h, splits, dtype=torch.float32),
            q.new_empty(bsz, h, splits, d, dtype=torch.float32),
        )
    m, l, acc = work  # noqa: E741
    _decode_part[(bsz, kv, splits)](
        q.contiguous(),
        k_pool,
        v_pool,
        tables,
        lens,
        m,
        l,
        acc,
        1.0 / math.sqrt(d),
        tables.stride(0),
        KV=kv,
        G=g,
        D=d,
        D_PAD=max(16, triton.next_power_of_2(d)),
        G_PAD=max(MIN_ROWS, triton.next_power_of_2(g)),
        BS=bs,
        S=splits,
        BN=BLOCK_N,
    )
    return merge_splits(m, l, acc).to(q.dtype)
