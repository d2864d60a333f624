"""Attention over a paged key/value pool.

The pool for one layer is `[num_blocks, block_size, kv_heads, head_dim]`; a sequence's keys live in the
blocks its block table lists, in order. `PagedBatch` describes one forward: the flattened query rows of
every sequence, the slot each new K/V row is written to, and the slots each sequence attends over.

Three paths with one contract (queries of a sequence sit at the last `q_len` of its `ctx_len` positions,
causal):
- `paged_attention_reference`: gather, explicit float32 softmax; what tests compare to.
- `paged_attention`: the CPU path. Decoding rows are grouped by the padded bucket of their history
  length, one masked SDPA call per group (bit-identical to decoding each alone, see
  `kernels.attention`); a prefill chunk gets one SDPA call over its gathered history.
- `paged_attention_blockwise`: online softmax over block columns of the block table for all sequences at
  once (no gathered copy of the history); the path for CUDA and MPS, written in plain torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ripelm.kernels.attention import attention, decode_attention, decode_bucket


@dataclass
class DecodeGroup:
    """Single-query sequences whose histories pad to the same bucket: one SDPA call for all of them."""

    rows: torch.Tensor  # [B] query rows in the flattened batch
    slots: torch.Tensor  # [B, P] flat pool slots of each history, padded with the sequence's first slot
    lengths: torch.Tensor  # [B] keys each row sees


@dataclass
class PagedBatch:
    block_size: int
    block_tables: list[list[int]]  # per sequence: pool block ids in position order
    q_lens: list[int]  # query rows per sequence, in the order rows are flattened
    ctx_lens: list[int]  # keys each sequence sees after this forward's writes (its new rows included)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if not (len(self.block_tables) == len(self.q_lens) == len(self.ctx_lens)):
            raise ValueError("block_tables, q_lens and ctx_lens must have one entry per sequence")
        bs = self.block_size
        self.q_starts: list[int] = []
        row = 0
        new_slots: list[torch.Tensor] = []
        buckets: dict[int, list[tuple[int, torch.Tensor, int]]] = {}
        # Sequences with several query rows (prefill chunks): (first row, rows, keys, key slots).
        self.multi: list[tuple[int, int, int, torch.Tensor | slice]] = []
        for table, q, n in zip(self.block_tables, self.q_lens, self.ctx_lens, strict=True):
            if not (1 <= q <= n) or len(table) * bs < n:
                raise ValueError(f"bad sequence: {q} queries, {n} keys, {len(table)} blocks of {bs}")
            self.q_starts.append(row)
            slots = _slots(table, n, bs)
            new_slots.append(slots[n - q :])
            if q == 1:
                p = decode_bucket(n)
                padded = torch.cat([slots, slots[:1].expand(p - n)])
                buckets.setdefault(p, []).append((row, padded, n))
            else:
                self.multi.append((row, q, n, _as_slice(table, n, bs) or slots.to(self.device)))
            row += q
        self.num_rows = row
        self.slot_mapping = torch.cat(new_slots).to(self.device)
        self.decode_groups = [
            DecodeGroup(
                rows=torch.tensor([r for r, _, _ in members], device=self.device),
                slots=torch.stack([sl for _, sl, _ in members]).to(self.device),
                lengths=torch.tensor([n for _, _, n in members], device=self.device),
            )
            for _, members in sorted(buckets.items())
        ]

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

    Decoding rows: one padded, masked SDPA call per bucket (see `decode_attention`); rows with several
    queries: one SDPA call per sequence over its gathered history (a view when its blocks are consecutive).
    """
    kv, d = k_pool.shape[-2:]
    k_flat, v_flat = k_pool.view(-1, kv, d), v_pool.view(-1, kv, d)
    if len(batch.decode_groups) == 1 and not batch.multi:
        g = batch.decode_groups[0]
        return _decode_group(q, k_flat, v_flat, g)  # rows are already in order
    out = torch.empty_like(q)
    for g in batch.decode_groups:
        out[g.rows] = _decode_group(q[g.rows], k_flat, v_flat, g)
    for start, n_q, n_k, slots in batch.multi:
        k, v = gather_kv(k_pool, v_pool, slots)
        out[start : start + n_q] = attention(q[start : start + n_q], k, v, n_k - n_q)
    return out


def _decode_group(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, g: DecodeGroup
) -> torch.Tensor:
    k = k_flat[g.slots].permute(0, 2, 1, 3)  # [B, KV, P, D]
    v = v_flat[g.slots].permute(0, 2, 1, 3)
    return decode_attention(q, k, v, g.lengths)


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
