"""Block bookkeeping for a model with sliding-window layers (Gemma 3): the window layers keep only the window.

The pool tensors hold every layer for every block id. `WindowedAllocator` hands the full-attention layers
their blocks from one `BlockAllocator` and the sliding-window layers theirs from a second one over the same
ids (a block id then names different memory in the two layer groups, so the two never collide). A sequence's
`BlockTable` carries the window layers' table in `local`; after every commit the blocks wholly before the
window of the next position (`num_tokens - window + 1`) go back to the second allocator and their entries
become `HOLE`. So a window layer holds at most window/block_size + 1 blocks per sequence, however long the
sequence; with a speculative verify in flight, the k reserved positions on top.

Why no rollback margin: blocks are released only from the committed length. A verify writes its k+1 rows
past it and a rejection truncates back to no less than it, so no released block is ever needed again.

Prefix caching: the window allocator registers full blocks under the same chain hashes as the full one, so
a later prompt reuses them; a match needs only the blocks of the last window (`match_prefix`). A partly
filled tail block is not matched for the window layers (up to block_size - 1 tokens are recomputed).

It has the `BlockAllocator` interface the scheduler and engine use; `num_free`/`blocks_needed` are
combined so that `blocks_needed(t, n) + m > num_free` holds exactly when either allocator lacks room.
"""

from __future__ import annotations

from collections.abc import Sequence

from ripelm.runtime.block_allocator import HOLE, BlockAllocator, BlockTable, PoolExhaustedError


class WindowedAllocator:
    def __init__(self, full: BlockAllocator, local: BlockAllocator, window: int):
        if full.block_size != local.block_size or window < 1:
            raise ValueError("the two allocators need one block size, and the window at least one position")
        self.full = full
        self.local = local
        self.window = window
        self.block_size = full.block_size
        self.hash_fn = full.hash_fn

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.full.num_blocks

    @property
    def num_free(self) -> int:
        return self.full.num_free

    @property
    def num_used(self) -> int:
        return self.full.num_used

    @property
    def evictions(self) -> int:
        return self.full.evictions + self.local.evictions

    @property
    def copies(self) -> list[tuple[int, int]]:
        return self.full.copies

    def blocks_needed(self, table: BlockTable, new_len: int) -> int:
        need_full = self.full.blocks_needed(table, new_len)
        need_local = self.local.blocks_needed(self._local(table), new_len)
        return max(need_full, need_local + self.full.num_free - self.local.num_free)

    def held_local(self, table: BlockTable) -> int:
        """Blocks the window layers hold for this sequence."""
        return sum(b != HOLE for b in table.local.blocks) if table.local is not None else 0

    def window_blocks(self, table: BlockTable) -> list[int]:
        """The window layers' block ids in position order, released entries as block 0 (never read)."""
        return [b if b != HOLE else 0 for b in self._local(table).blocks]

    # ---- prefix cache ---------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int], limit: int) -> BlockTable:
        table = self.full.match_prefix(tokens, limit)
        bs, loc = self.block_size, self.local
        n = table.num_tokens // bs * bs
        while True:  # the longest full-block prefix whose last window the window layers still have cached
            first = max(0, n - self.window + 1) // bs
            found = []
            for i in range(first, n // bs):
                bid = loc.cached.get(table.hashes[i])
                if bid is None or loc.blocks[bid].token_ids != list(tokens[i * bs : (i + 1) * bs]):
                    break
                found.append(bid)
            if len(found) == n // bs - first:
                break
            n -= bs
        if n < table.num_tokens:
            self.full.truncate(table, n)
        for bid in found:
            loc._ref(bid)
        table.local = BlockTable([HOLE] * first + found, n, list(table.hashes[: n // bs]))
        return table

    # ---- growing, writing, shrinking ------------------------------------------------------------
    def reserve(self, table: BlockTable, new_len: int) -> None:
        if self.local.blocks_needed(self._local(table), new_len) > self.local.num_free:
            raise PoolExhaustedError("no free KV blocks for the sliding-window layers")
        self.full.reserve(table, new_len)
        self.local.reserve(table.local, new_len)

    def slots(self, table: BlockTable, start: int, count: int) -> list[int]:
        return self.full.slots(table, start, count)

    def commit(self, table: BlockTable, tokens: Sequence[int]) -> None:
        self.full.commit(table, tokens)
        self.local.commit(table.local, tokens)
        self.local.release_before(table.local, table.num_tokens - self.window + 1)

    def fork(self, table: BlockTable) -> BlockTable:
        child = self.full.fork(table)
        child.local = self.local.fork(self._local(table))
        return child

    def truncate(self, table: BlockTable, length: int) -> None:
        loc, bs = self._local(table), self.block_size
        needed = loc.blocks[max(0, length - self.window + 1) // bs : -(-length // bs)]
        if length < table.num_tokens and HOLE in needed:
            raise AssertionError(f"truncating to {length} needs a released window block")
        self.full.truncate(table, length)
        self.local.truncate(loc, length)

    def free(self, table: BlockTable) -> None:
        self.full.free(table)
        if table.local is not None:
            self.local.free(table.local)

    def check(self) -> None:
        self.full.check()
        self.local.check()

    def _local(self, table: BlockTable) -> BlockTable:
        if table.local is None:
            if table.num_tokens or table.blocks:
                raise AssertionError("a table with positions but no window-layer table")
            table.local = BlockTable()
        return table.local
