"""Key/value memory for the transformer forward.

`PagedKVCache` is the engine's memory: one pool per layer, `[num_blocks, block_size, kv_heads,
head_dim]` for K and for V, sized from a memory budget, with a `BlockAllocator` saying which blocks
hold which tokens. `PagedStep` is what one batched forward attends through.
The forward only talks to a cache through `attend(layer, q, k, v)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from ripelm.kernels.attention import decode_attention
from ripelm.kernels.paged_attention import (
    DecodeGroup,
    PagedBatch,
    group_mask,
    paged_attention,
    paged_attention_blockwise,
    paged_window_attention,
)
from ripelm.runtime.block_allocator import BlockAllocator, chain_hash
from ripelm.runtime.errors import BadSettingError
from ripelm.runtime.window_allocator import WindowedAllocator

DEFAULT_BLOCK_SIZE = 16
DEFAULT_KV_FRACTION = 0.25  # of available memory, when no --kv-memory is given
DEFAULT_KV_CAP = 2 << 30  # bytes; more only on request
DEFAULT_KV_CONTEXTS = 4  # ... and no more than this many full context windows


class PagedKVCache:
    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        hash_fn: Callable[[int, Sequence[int]], int] = chain_hash,
        window: int | None = None,
        window_layers: Sequence[bool] = (),
        window_blocks: int | None = None,
    ):
        """`window` with `window_layers` (True per sliding-window layer): those layers get their blocks from
        a second allocator that frees what falls out of the window (`runtime.window_allocator`), of
        `window_blocks` ids (default and at most num_blocks): the window layers' memory past those ids is
        never touched (on the CPU never resident: the pool's pages are mapped on first write)."""
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        # Attention reads whole blocks and masks what a sequence has not written, which only works if the
        # pool holds no NaNs: it starts zeroed. On the CPU the zeroed pages come from the OS on first touch
        # (calloc of a large buffer), so resident memory follows use, not the budget.
        alloc = _lazy_zeros if self.device.type == "cpu" else torch.zeros
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.allocator: BlockAllocator | WindowedAllocator = BlockAllocator(num_blocks, block_size, hash_fn)
        self.windowed = bool(window) and any(window_layers)
        self.layer_groups: list[tuple[BlockAllocator, torch.Tensor | slice]] = [(self.allocator, slice(None))]
        if self.windowed:
            local = BlockAllocator(min(num_blocks, window_blocks or num_blocks), block_size, hash_fn)
            self.layer_groups = [
                (alloc, torch.tensor([i for i, w in enumerate(window_layers) if w == is_local]))
                for alloc, is_local in ((self.allocator, False), (local, True))
            ]
            self.allocator = WindowedAllocator(self.allocator, local, window)
        # Per layer: the block-shaped pools and the same memory as flat [slots, KV, D] rows, made once
        # (a decode step reads them 30 times; views cost about a microsecond each).
        self.layers = [
            (
                self.k[i],
                self.v[i],
                self.k[i].view(-1, n_kv_heads, head_dim),
                self.v[i].view(-1, n_kv_heads, head_dim),
            )
            for i in range(n_layers)
        ]
        self._run_views: tuple[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @staticmethod
    def bytes_per_block(
        n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
    ) -> int:
        return 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def used_blocks(self) -> int:
        """Blocks in use, as whole blocks of all layers: with window layers on their own allocator, each
        allocator's blocks count for its share of the layers (the KV memory figure of the status bar)."""
        if not self.windowed:
            return self.allocator.num_used
        n_layers = self.k.shape[0]
        held = sum(alloc.num_used * len(layers) for alloc, layers in self.layer_groups)
        return -(-held // n_layers)

    def apply_copies(self) -> None:
        """Carry out pending copy-on-write block copies (all layers) before the next forward writes."""
        for alloc, layers in self.layer_groups:  # a window layer's block id names other memory
            for src, dst in alloc.copies:
                self.k[layers, dst] = self.k[layers, src]
                self.v[layers, dst] = self.v[layers, src]
            alloc.copies.clear()

    def step(self, batch: PagedBatch) -> PagedStep:
        return PagedStep(self, batch)

    def run_views(self, blocks: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, head-major [1, KV, P, D] views of a run of consecutive blocks. The last run is kept:
        a lone sequence decodes over the same run for DECODE_PAD steps."""
        key = (blocks.start, blocks.stop)
        if self._run_views is None or self._run_views[0] != key:
            views = [
                (k[blocks].flatten(0, 1)[None].transpose(1, 2), v[blocks].flatten(0, 1)[None].transpose(1, 2))
                for k, v, _, _ in self.layers
            ]
            self._run_views = (key, views)
        return self._run_views[1]


class PagedStep:
    """One forward over several sequences: write each layer's new K/V rows, attend over each history."""

    def __init__(self, cache: PagedKVCache, batch: PagedBatch):
        self.cache = cache
        self.batch = batch
        self._window_batch: PagedBatch | None = None
        self.blockwise = cache.device.type != "cpu"
        # The common case, one sequence decoding over consecutive blocks: its history is read in place
        # through views made once for all layers.
        groups = batch.decode_groups
        self.lone: tuple[list[tuple[torch.Tensor, torch.Tensor]], DecodeGroup] | None = None
        if (
            not self.blockwise
            and len(groups) == 1
            and not batch.multi
            and isinstance(groups[0].blocks, slice)
        ):
            self.lone = (cache.run_views(groups[0].blocks), groups[0])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kp, vp, k_rows, v_rows = self.cache.layers[layer]
        k_rows.index_copy_(0, self.batch.slot_mapping, k.to(k_rows.dtype))  # `write_kv`, inlined
        v_rows.index_copy_(0, self.batch.slot_mapping, v.to(v_rows.dtype))
        if self.lone is not None:
            views, group = self.lone
            k_all, v_all = views[layer]
            if k_all.dtype != q.dtype:
                k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            return decode_attention(
                q, k_all, v_all, group.lengths, group_mask(group, k_all.shape[-2], q.dtype)
            )
        if self.blockwise:
            return paged_attention_blockwise(q, kp, vp, self.batch)
        return paged_attention(q, kp, vp, self.batch)

    def attend_window(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
    ) -> torch.Tensor:
        """`attend` for a sliding-window layer: each query sees only the last `window` positions."""
        kp, vp, k_rows, v_rows = self.cache.layers[layer]
        batch = self.window_batch()
        k_rows.index_copy_(0, batch.slot_mapping, k.to(k_rows.dtype))
        v_rows.index_copy_(0, batch.slot_mapping, v.to(v_rows.dtype))
        return paged_window_attention(q, kp, vp, batch, window)

    def window_batch(self) -> PagedBatch:
        """The batch over the window layers' own block tables (the same batch when the cache has none)."""
        if self._window_batch is None:
            b = self.batch
            if not self.cache.windowed:
                self._window_batch = b
            elif b.window_tables is None:
                raise ValueError("a windowed cache's step needs the window layers' block tables")
            else:
                self._window_batch = replace(b, block_tables=b.window_tables, window_tables=None)
        return self._window_batch


def _lazy_zeros(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed CPU tensor whose pages are mapped only when first written (numpy's zeros is a calloc)."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def parse_memory(text: str) -> int:
    """'512M', '2G', '1.5GiB', '800000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise BadSettingError(f"cannot read '{text}' as a memory size (examples: 512M, 2G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def kv_pool_blocks(
    bytes_per_block: int, context_length: int, block_size: int, budget: int | None, available: int
) -> int:
    """Pool size in blocks: an explicit budget as given, else a share of available memory, capped at 2 GiB
    and at a few context windows, that still holds at least one full context window."""
    if budget is not None:
        if budget < bytes_per_block:
            raise BadSettingError(
                f"a KV memory budget of {budget} bytes is smaller than one block ({bytes_per_block} bytes)"
            )
        return budget // bytes_per_block
    one_context = -(-context_length // block_size)
    share = min(int(available * DEFAULT_KV_FRACTION), DEFAULT_KV_CAP) // bytes_per_block
    return max(min(share, DEFAULT_KV_CONTEXTS * one_context), one_context)


def kv_dtype_for(model) -> torch.dtype:  # noqa: ANN001 - a runtime.model.Transformer
    """The K/V dtype of a model's paged pool: float16 on the native step (as llama.cpp keeps it; bfloat16
    keys cost it agreement), else the model's compute dtype."""
    from ripelm.runtime.native_decode import NATIVE_KV_DTYPE

    return NATIVE_KV_DTYPE if getattr(model, "native", None) is not None else model.dtype


def paged_cache_for(  # noqa: ANN001
    model, num_blocks: int, block_size: int, hash_fn, windowed: bool = False, window_blocks: int | None = None
) -> PagedKVCache:
    """A paged pool shaped for `model` (its layers, K/V heads, head size, K/V dtype and device); `windowed`:
    its sliding-window layers, if any, free the blocks that fall out of their window and use at most
    `window_blocks` block ids."""
    cfg = model.cfg
    swa = [cfg.is_swa(i) for i in range(cfg.n_layers)] if windowed and cfg.sliding_window else []
    return PagedKVCache(
        cfg.n_layers,
        num_blocks,
        cfg.n_kv_heads,
        cfg.head_dim,
        block_size=block_size,
        dtype=kv_dtype_for(model),
        device=model.device,
        hash_fn=hash_fn,
        window=cfg.sliding_window if swa else None,
        window_layers=swa,
        window_blocks=window_blocks,
    )


def window_pool_blocks(window: int | None, block_size: int, max_seqs: int, prefill_chunk: int) -> int | None:
    """Block ids the sliding-window layers need at most: each running sequence holds its window plus one
    block between steps, and a step adds a block per sequence (its next position), a proposal's block, and
    one prefill chunk; the rest are cached windows for prefix hits. Fewer would only preempt sooner."""
    if not window:
        return None
    per_seq = -(-window // block_size) + 3
    return max_seqs * per_seq + -(-prefill_chunk // block_size) + 1
