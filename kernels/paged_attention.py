"""Attention over a paged key/value pool.

The pool for one layer is `[num_blocks, block_size, kv_heads, head_dim]`; a sequence's keys live in the
blocks its block table lists, in order. `PagedBatch` describes one forward: the flattened query rows of
every sequence, the slot each new K/V row is written to, and the slots each sequence attends over.

Three paths with one contract (queries of a sequence sit at the last `q_len` of its `ctx_len` positions,
causal):
- `paged_attention_reference`: gather, explicit float32 softmax; what tests compare to.
- `paged_attention`: the CPU path. Decoding rows are grouped by the power of two above their history
  length; a group gathers its rows' whole blocks, padded to its longest history, for one masked SDPA
  call (bit-identical to decoding each row alone, see `kernels.attention`; grouping only bounds the
  padding to under 2x). Masked padding must be finite, so the CPU pool starts zeroed. A prefill
  chunk gets one SDPA call over its gathered history.
- `paged_attention_blockwise`: online softmax over block columns of the block table for all sequences at
  once (no gathered copy of the history); the path for CUDA and MPS, written in plain torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ripelm.kernels.attention import DECODE_PAD, attention, decode_attention, decode_mask, window_attention


@dataclass
class DecodeGroup:
    """Single-query sequences of similar history lengths: one SDPA call for all of them."""

    rows: torch.Tensor  # [B] query rows in the flattened batch
    # [B, nb] pool block ids of each history, padded to a common width (the padding is masked), or a
    # slice of consecutive pool blocks for a lone sequence (read in place, no copy)
    blocks: torch.Tensor | slice
    lengths: torch.Tensor  # [B] keys each row sees
    mask: torch.Tensor | None = None  # `decode_mask`, built at the first layer, reused by the others


@dataclass
class PagedBatch:
    block_size: int
    block_tables: list[list[int]]  # per sequence: pool block ids in position order
    q_lens: list[int]  # query rows per sequence, in the order rows are flattened
    ctx_lens: list[int]  # keys each sequence sees after this forward's writes (its new rows included)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_blocks: int | None = None  # pool size, when known: lets a lone decode row read blocks in place
    # per sequence: the sliding-window layers' own block ids, when they keep only their window (else None)
    window_tables: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if not (len(self.block_tables) == len(self.q_lens) == len(self.ctx_lens)):
            raise ValueError("block_tables, q_lens and ctx_lens must have one entry per sequence")
        bs = self.block_size
        self.q_starts: list[int] = []
        row = 0
        new_slots: list[int] = []
        groups: dict[int, list[tuple[int, list[int], int]]] = {}
        # Sequences with several query rows (prefill chunks): (first row, rows, keys, key slots).
        self.multi: list[tuple[int, int, int, torch.Tensor | slice]] = []
        for table, q, n in zip(self.block_tables, self.q_lens, self.ctx_lens, strict=True):
            if not (1 <= q <= n) or len(table) * bs < n:
                raise ValueError(f"bad sequence: {q} queries, {n} keys, {len(table)} blocks of {bs}")
            self.q_starts.append(row)
            new_slots.extend(table[p // bs] * bs + p % bs for p in range(n - q, n))
            if q == 1:
                groups.setdefault((n - 1).bit_length(), []).append((row, table, n))
            else:
                slots = _as_slice(table, n, bs) or _slots(table, n, bs).to(self.device)
                self.multi.append((row, q, n, slots))
            row += q
        self.num_rows = row
        self.slot_mapping = torch.tensor(new_slots, dtype=torch.long, device=self.device)
        self.decode_groups = [self._decode_group(members) for _, members in sorted(groups.items())]

    def _decode_group(self, members: list[tuple[int, list[int], int]]) -> DecodeGroup:
        """Every member's blocks padded with block 0 to the group's width: the longest history rounded up
        so that the padded key length is a multiple of DECODE_PAD (the padding only has to be finite)."""
        bs = self.block_size
        width = -(-max(n for _, _, n in members) // bs)
        while (width * bs) % DECODE_PAD:
            width += 1
        lengths = torch.tensor([n for _, _, n in members], device=self.device)
        rows = torch.tensor([r for r, _, _ in members], device=self.device)
        if len(members) == 1:
            table, n = members[0][1], members[0][2]
            used = -(-n // bs)
            first = table[0]
            if (
                self.num_blocks is not None
                and first + width <= self.num_blocks
                and all(table[i] == first + i for i in range(used))
            ):
                return DecodeGroup(rows, slice(first, first + width), lengths)
        padded = [t[: -(-n // bs)] + [0] * (width - -(-n // bs)) for _, t, n in members]
        return DecodeGroup(rows, torch.tensor(padded, dtype=torch.long, device=self.device), lengths)

    def tables_tensor(self) -> torch.Tensor:
        """Block tables padded with block 0 to [B, max_blocks] (padding is masked by ctx_lens)."""
        width = max(len(t) for t in self.block_tables)
        rows = [t + [0] * (width - len(t)) for t in self.block_tables]
        return torch.tensor(rows, dtype=torch.long, device=self.device)


def _slots(table: list[int], n: int, bs: int) -> torch.Tensor:
    blocks = torch.tensor(table, dtype=torch.long)
    return (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:n]


def _as_slice(table: list[int], n: int, bs: int) -> slice | None:
    """A slice of the flattened pool when the blocks holding the first n positions are consecutive."""
    used = (n + bs - 1) // bs
    first = table[0]
    if all(table[i] == first + i for i in range(used)):
        return slice(first * bs, first * bs + n)
    return None


def write_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store new rows k, v [T, KV, D] at flat slots [T] of one layer's pools."""
    kv, d = k_pool.shape[-2:]
    k_pool.view(-1, kv, d).index_copy_(0, slot_mapping, k.to(k_pool.dtype))
    v_pool.view(-1, kv, d).index_copy_(0, slot_mapping, v.to(v_pool.dtype))


def gather_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor | slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's history as head-major [KV, S, D] tensors (views when `slots` is a slice)."""
    kv, d = k_pool.shape[-2:]
    k = k_pool.view(-1, kv, d)[slots]
    v = v_pool.view(-1, kv, d)[slots]
    return k.transpose(0, 1), v.transpose(0, 1)


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedBatch
) -> torch.Tensor:
    """q [T, H, D] (rows of all sequences, flattened) -> [T, H, D].

    Decoding rows: one padded, masked SDPA call per group (see `decode_attention`); rows with several
    queries: one SDPA call per sequence over its gathered history (a view when its blocks are consecutive).
    """
    if len(batch.decode_groups) == 1 and not batch.multi:
        return _decode_group(q, k_pool, v_pool, batch.decode_groups[0])  # rows are already in order
    out = torch.empty_like(q)
    for g in batch.decode_groups:
        out[g.rows] = _decode_group(q[g.rows], k_pool, v_pool, g)
    for start, n_q, n_k, slots in batch.multi:
        k, v = gather_kv(k_pool, v_pool, slots)
        if k.dtype != q.dtype:  # an f16 pool (the native decode step's) under bf16 prefill
            k, v = k.to(q.dtype), v.to(q.dtype)
        out[start : start + n_q] = attention(q[start : start + n_q], k, v, n_k - n_q)
    return out


def paged_window_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedBatch, window: int
) -> torch.Tensor:
    """`paged_attention` for a sliding-window layer (see `window_attention`): each sequence reads only the
    blocks its window covers, so blocks that fell out of it may already be freed (their table entries are
    never read)."""
    bs = batch.block_size
    out = torch.empty_like(q)
    for start, n_q, n_k, table in zip(
        batch.q_starts, batch.q_lens, batch.ctx_lens, batch.block_tables, strict=True
    ):
        lo = max(0, n_k - n_q - window + 1)  # first key position any of its queries sees
        pos = torch.arange(lo, n_k)
        blocks = torch.tensor(table[lo // bs : -(-n_k // bs)], dtype=torch.long)
        slots = (blocks[(pos // bs) - lo // bs] * bs + pos % bs).to(q.device)
        k, v = gather_kv(k_pool, v_pool, slots)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        # keys start at position lo: shift the query positions by as much
        out[start : start + n_q] = window_attention(q[start : start + n_q], k, v, n_k - n_q - lo, window)
    return out


def _decode_group(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, g: DecodeGroup
) -> torch.Tensor:
    """Whole blocks are gathered (contiguous 16-row chunks, or a view for consecutive blocks)."""
    kv, d = k_pool.shape[-2:]
    if isinstance(g.blocks, slice):
        k, v = k_pool[g.blocks].reshape(1, -1, kv, d), v_pool[g.blocks].reshape(1, -1, kv, d)
    else:
        b = g.blocks.shape[0]
        k = k_pool.index_select(0, g.blocks.view(-1)).view(b, -1, kv, d)
        v = v_pool.index_select(0, g.blocks.view(-1)).view(b, -1, kv, d)
    k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return decode_attention(q, k, v, g.lengths, group_mask(g, k.shape[-2], q.dtype))


def group_mask(g: DecodeGroup, p: int, dtype: torch.dtype) -> torch.Tensor:
    """The group's decode mask over p padded keys, made once per step."""
    if g.mask is None or g.mask.dtype != dtype:
        g.mask = decode_mask(g.lengths, p, dtype)
    return g.mask


def paged_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedBatch
) -> torch.Tensor:
    """Same contract as `paged_attention`, float32 softmax(QK^T / sqrt(d)) V per sequence."""
    h, d = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for start, n_q, n_k, table in zip(
        batch.q_starts, batch.q_lens, batch.ctx_lens, batch.block_tables, strict=True
    ):
        slots = _slots(table, n_k, batch.block_size).to(q.device)
        k, v = gather_kv(k_pool, v_pool, slots)  # [KV, S, D]
        rep = h // k.shape[0]
        kf = k.float().repeat_interleave(rep, dim=0)
        vf = v.float().repeat_interleave(rep, dim=0)
        qs = q[start : start + n_q].float()
        scores = torch.einsum("thd,hsd->hts", qs, kf) / math.sqrt(d)
        qpos = torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
        mask = torch.arange(n_k, device=q.device)[None, :] <= qpos
        scores = scores.masked_fill(~mask[None], float("-inf"))
        out[start : start + n_q] = torch.einsum("hts,hsd->thd", scores.softmax(-1), vf).to(q.dtype)
    return out


def paged_attention_blockwise(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedBatch
) -> torch.Tensor:
    """Online softmax over the block table's columns, all sequences at once, in float32.

    Queries are padded to [B, Qmax, H, D]; each step loads one block per sequence ([B, bs, KV, D]),
    so memory traffic is the history once, with no [B, S] gathered copy.
    """
    bsz = len(batch.q_lens)
    t, h, d = q.shape
    kv = k_pool.shape[-2]
    rep = h // kv
    bs = batch.block_size
    dev = q.device
    q_max = max(batch.q_lens)
    qp = q.new_zeros(bsz, q_max, h, d, dtype=torch.float32)
    row_idx = torch.cat(
        [torch.arange(s, s + n, device=dev) for s, n in zip(batch.q_starts, batch.q_lens, strict=True)]
    )
    seq_idx = torch.cat([torch.full((n,), i, device=dev) for i, n in enumerate(batch.q_lens)])
    col_idx = torch.cat([torch.arange(n, device=dev) for n in batch.q_lens])
    qp[seq_idx, col_idx] = q[row_idx].float()
    qp = qp.view(bsz, q_max, kv, rep, d) / math.sqrt(d)
    ctx = torch.tensor(batch.ctx_lens, device=dev)
    q_pos = (ctx - torch.tensor(batch.q_lens, device=dev))[:, None] + torch.arange(
        q_max, device=dev
    )  # [B, Qm]
    tables = batch.tables_tensor()
    m = torch.full((bsz, q_max, kv, rep), float("-inf"), device=dev)
    denom = torch.zeros((bsz, q_max, kv, rep), device=dev)
    acc = torch.zeros((bsz, q_max, kv, rep, d), device=dev)
    for j in range(tables.shape[1]):
        kb = k_pool[tables[:, j]].float()  # [B, bs, KV, D]
        vb = v_pool[tables[:, j]].float()
        k_pos = j * bs + torch.arange(bs, device=dev)  # [bs]
        visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < ctx[:, None, None])
        s = torch.einsum("bqgrd,bsgd->bqgrs", qp, kb)
        s = s.masked_fill(~visible[:, :, None, None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        # Rows that have seen nothing yet keep m = -inf; use 0 there so exp() stays finite.
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - safe[..., None])
        scale = torch.exp(m - safe)
        denom = denom * scale + p.sum(-1)
        acc = acc * scale[..., None] + torch.einsum("bqgrs,bsgd->bqgrd", p, vb)
        m = m_new
    out = (acc / denom.clamp_min(1e-30)[..., None]).view(bsz, q_max, h, d)
    return out[seq_idx, col_idx].to(q.dtype)
