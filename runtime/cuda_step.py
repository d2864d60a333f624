"""Decode steps on CUDA as replayed CUDA graphs.

A decode step of a small model is hundreds of short kernels; launched one by one from Python, the launches
cost more than the work. So the engine runs decode steps on CUDA through a static-shaped copy of the
forward, captured once per batch bucket (1, 2, 4, 8, 16 rows) into a CUDA graph at load, and replayed:

- inputs live in fixed buffers: the rows' embeddings, positions, the slot each new K/V row goes to, each
  row's key count and its block table padded to the context window's width. A step fills them (one
  host-to-device copy of the integers) and replays its bucket's graph.
- rows past the real ones repeat row 0 exactly (same embedding, position, slot and table): they compute
  the same values and write the same K/V bytes to the same slot, so padding never touches another
  sequence's memory.
- attention is `kernels.triton_attention` (one Triton kernel per layer, splits fixed per bucket);
  everything else is the model's own `Block.forward` (its int4/int8/dense linears, norms and RoPE).
- capture writes block 0 of the pool (slot 0 of every layer) while the pool is still empty; it is zeroed
  again afterwards.

`StaticDecode(graphs=False)` runs the same static forward eagerly: that is how the tests check it against
the engine's general path on the CPU, with `paged_decode_torch` standing in for the Triton kernel.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from ripelm.kernels.rmsnorm import rms_norm
from ripelm.runtime.model import KVCacheLike, RopeTables, Transformer

BUCKETS = (1, 2, 4, 8, 16)


def graphs_enabled() -> bool:
    """CUDA graphs for decode unless RIPELM_CUDA_GRAPHS=0 (the eager blockwise path, for comparison). The
    engine asks only on CUDA: Triton is imported here, not when the module loads (it costs a CPU-only run
    time for nothing)."""
    if os.environ.get("RIPELM_CUDA_GRAPHS", "1") == "0":
        return False
    from ripelm.kernels import triton_attention

    return triton_attention.available()


def paged_decode_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    splits: int = 1,
    work: object = None,
) -> torch.Tensor:
    """The Triton kernel's contract in plain torch (float32 softmax over every row's whole padded table):
    q [B, H, D], pools [blocks, bs, KV, D], tables [B, W], lens [B] -> [B, H, D]."""
    del splits, work
    bsz, h, d = q.shape
    _, bs, kv, _ = k_pool.shape
    k = k_pool[tables].reshape(bsz, -1, kv, d).float()  # [B, W * bs, KV, D]
    v = v_pool[tables].reshape(bsz, -1, kv, d).float()
    qf = q.float().view(bsz, kv, h // kv, d)
    scores = torch.einsum("bkgd,bskd->bkgs", qf, k) / d**0.5
    visible = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgs,bskd->bkgd", scores.softmax(-1), v)
    return out.reshape(bsz, h, d).to(q.dtype)


def static_decode_or_none(model: Transformer, cache, context_length: int) -> StaticDecode | None:  # noqa: ANN001
    """The engine's CUDA decode step; if the kernels cannot be built or captured here, one line on stderr
    and None (the engine then decodes through the eager blockwise path), never a failed load."""
    if model.cfg.sliding_window is not None:  # the captured step has no sliding-window attention
        return None
    try:
        return StaticDecode(model, cache, context_length)
    except Exception as exc:  # a Triton compile error, a capture error: whatever it is, decoding still works
        cache.k[:, 0].zero_()
        cache.v[:, 0].zero_()
        print(
            f"ripe: CUDA graph decode unavailable ({type(exc).__name__}: {exc}); decoding eagerly",
            file=sys.stderr,
        )
        return None


class _Attend(KVCacheLike):
    """What the static forward attends through: this step's K/V go to `slots`, then one attention call."""

    def __init__(self, cache, slots, tables, lens, splits, work, fn):  # noqa: ANN001 - see StaticDecode
        self.cache, self.slots, self.tables, self.lens = cache, slots, tables, lens
        self.splits, self.work, self.fn = splits, work, fn

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kp, vp, k_rows, v_rows = self.cache.layers[layer]
        k_rows.index_copy_(0, self.slots, k.to(k_rows.dtype))
        v_rows.index_copy_(0, self.slots, v.to(v_rows.dtype))
        return self.fn(q, kp, vp, self.tables, self.lens, self.splits, self.work)


class _Bucket:
    """Fixed buffers of one batch size, and its graph once captured."""

    def __init__(self, rows: int, width: int, hidden: int, device: torch.device, pinned: bool):
        self.rows, self.width = rows, width
        self.x = torch.zeros(rows, hidden, dtype=torch.float32, device=device)
        # pos | slot | len | table: one int64 buffer, so a step copies its integers in one transfer
        self.meta = torch.zeros(rows * (3 + width), dtype=torch.long, device=device)
        self.stage = torch.zeros(rows * (3 + width), dtype=torch.long, pin_memory=pinned)
        self.pos = self.meta[:rows]
        self.slots = self.meta[rows : 2 * rows]
        self.lens = self.meta[2 * rows : 3 * rows]
        self.tables = self.meta[3 * rows :].view(rows, width)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None


class StaticDecode:
    """Decode steps of up to BUCKETS[-1] rows over `cache` through static buffers (graphs on CUDA)."""

    def __init__(
        self,
        model: Transformer,
        cache,  # noqa: ANN001 - a PagedKVCache
        context_length: int,
        *,
        graphs: bool = True,
        attention=None,  # noqa: ANN001 - paged_decode_attention's signature; default: the Triton kernel
    ):
        self.model, self.cache = model, cache
        self.bs = cache.block_size
        self.width = -(-context_length // self.bs)
        self.context_length = context_length
        cfg = model.cfg
        model.rope_tables(0, context_length)  # grows the model's cos/sin tables to the whole window
        self.cos, self.sin = model._rope_cache  # type: ignore[misc]
        from ripelm.kernels import triton_attention

        self.attention = attention or triton_attention.paged_decode_attention
        dev = model.device
        self.graphs = graphs and dev.type == "cuda"
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        self.buckets: list[_Bucket] = []
        self._attend: dict[int, _Attend] = {}
        for rows in BUCKETS:
            b = _Bucket(rows, self.width, cfg.hidden, dev, pinned=dev.type == "cuda")
            splits = triton_attention.splits_for(rows, cfg.n_kv_heads, context_length, sms)
            work = (
                torch.empty(rows, cfg.n_heads, splits, dtype=torch.float32, device=dev),
                torch.empty(rows, cfg.n_heads, splits, dtype=torch.float32, device=dev),
                torch.empty(rows, cfg.n_heads, splits, cfg.head_dim, dtype=torch.float32, device=dev),
            )
            self._attend[rows] = _Attend(cache, b.slots, b.tables, b.lens, splits, work, self.attention)
            self.buckets.append(b)
        if self.graphs:
            self._capture_all()

    @property
    def max_rows(self) -> int:
        return BUCKETS[-1]

    def takes(self, rows: int) -> bool:
        return rows <= self.max_rows

    @torch.inference_mode()
    def _compute(self, b: _Bucket) -> torch.Tensor:
        m = self.model
        rope = RopeTables(self.cos[b.pos], self.sin[b.pos], m.neox, m.cfg.head_dim)
        x, attend = b.x, self._attend[b.rows]
        for layer in m.layers:
            x = layer(x, rope, attend, m.dtype)
        return m.output(rms_norm(x, m.output_norm, m.cfg.rms_eps)).float()

    def _capture_all(self) -> None:
        for b in self.buckets:
            b.lens.fill_(1)  # slot 0, one key: what capture runs on (block 0 is zeroed afterwards)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for b in self.buckets:  # compiles the kernels and lets the libraries pick their algorithms
                for _ in range(2):
                    self._compute(b)
        torch.cuda.current_stream().wait_stream(side)
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                b.out = self._compute(b)
            b.graph, pool = g, g.pool()
        torch.cuda.synchronize()
        self.cache.k[:, 0].zero_()
        self.cache.v[:, 0].zero_()

    def forward(self, x: torch.Tensor, positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """x [n, hidden] embeddings of one new token per sequence at `positions`, each sequence's block table
        (covering its position) -> float32 logits [n, vocab]."""
        n = len(positions)
        b = next(bk for bk in self.buckets if bk.rows >= n)
        rows, width, bs = b.rows, b.width, self.bs
        stage = b.stage.numpy()
        pos = np.asarray(positions + [positions[0]] * (rows - n), dtype=np.int64)
        table = stage[3 * rows :].reshape(rows, width)
        table[:] = 0
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        table[n:] = table[0]
        stage[:rows] = pos
        stage[rows : 2 * rows] = table[np.arange(rows), pos // bs] * bs + pos % bs
        stage[2 * rows : 3 * rows] = pos + 1
        b.meta.copy_(b.stage, non_blocking=True)
        b.x[:n].copy_(x)
        if rows > n:
            b.x[n:].copy_(x[:1].expand(rows - n, -1))
        if b.graph is not None:
            b.graph.replay()
            out = b.out
        else:
            out = self._compute(b)
        return out[:n].clone()  # type: ignore[index]
