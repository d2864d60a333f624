"""Which KV pool blocks hold which tokens: reference counts, block tables, prefix caching, copy-on-write.

Bookkeeping only (no tensors). A sequence owns a `BlockTable`: the pool blocks holding its positions in
order and how many positions are filled. Blocks are shared by reference count:
- Prefix caching: a full block is registered under the chain hash of its token ids (the hash of the
  previous block's hash and its own tokens), so any request whose prompt starts with the same tokens
  reuses it. A hit is always checked against the stored token ids: a hash collision is a miss, never a
  wrong block. When a sequence ends, its last partly filled block is kept too (indexed by the hash of
  the blocks before it), so the next chat turn only computes what is new.
- Fork (parallel samples, regenerate) shares every block; the first write into a shared, partly filled
  block copies it (`copies` lists the (src, dst) pairs the pool must apply before the forward).
- Truncate frees whole blocks past the new length (rolled-back drafts), reserved but unwritten ones too.
- Freed blocks that still hold cached tokens stay findable until the pool needs them: empty blocks are
  handed out first, then cached ones in least-recently-freed order (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ROOT_HASH = 0x9E3779B97F4A7C15  # prefix hash of a sequence's first block
HOLE = -1  # a table entry whose block was released (out of a sliding window; `runtime.window_allocator`)


def chain_hash(prefix_hash: int, tokens: Sequence[int]) -> int:
    return hash((prefix_hash, tuple(tokens)))


class PoolExhaustedError(RuntimeError):
    """Not enough free blocks for a reservation (the scheduler checks first; this guards bugs)."""


@dataclass
class Block:
    id: int
    ref_count: int = 0
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V this block holds, in order
    prefix_hash: int = ROOT_HASH  # chain hash of the full blocks before this one
    hash: int | None = None  # chain hash under which this full block is in the prefix cache
    indexed: bool = False  # findable by prefix_hash for partial reuse


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # positions 0..num_tokens-1 hold K/V
    hashes: list[int] = field(default_factory=list)  # chain hashes of the full blocks, in order
    local: BlockTable | None = None  # the sliding-window layers' own table (`runtime.window_allocator`)

    def prefix_hash(self, index: int) -> int:
        return ROOT_HASH if index == 0 else self.hashes[index - 1]


class BlockAllocator:
    def __init__(
        self, num_blocks: int, block_size: int, hash_fn: Callable[[int, Sequence[int]], int] = chain_hash
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the pool needs at least one block of at least one slot")
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.empty: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free, but holding cached tokens
        self.cached: dict[int, int] = {}  # chain hash -> full block id
        self.by_prefix: dict[int, set[int]] = {}  # prefix hash -> indexed block ids
        self.copies: list[tuple[int, int]] = []  # pending copy-on-write (src, dst) for the pool
        self.evictions = 0

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, table: BlockTable, new_len: int) -> int:
        """Blocks `reserve(table, new_len)` would take from the free lists."""
        bs = self.block_size
        need = max(0, -(-new_len // bs) - len(table.blocks))
        pos = table.num_tokens
        if new_len > pos and pos % bs and self.blocks[table.blocks[pos // bs]].ref_count > 1:
            need += 1  # copy-on-write of a shared partly filled block
        return need

    # ---- prefix cache ---------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int], limit: int) -> BlockTable:
        """A table sharing the longest cached prefix of `tokens` (at most `limit` tokens)."""
        bs = self.block_size
        table = BlockTable()
        prefix = ROOT_HASH
        n = 0
        while n + bs <= min(len(tokens), limit):
            chunk = list(tokens[n : n + bs])
            h = self.hash_fn(prefix, chunk)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            self._ref(bid)
            table.blocks.append(bid)
            table.hashes.append(h)
            n += bs
            prefix = h
        best, best_len = None, 0
        rest = tokens[n:limit]
        for bid in self.by_prefix.get(prefix, ()):
            stored = self.blocks[bid].token_ids
            m = 0
            for a, b in zip(stored, rest, strict=False):
                if a != b:
                    break
                m += 1
            if m > best_len:
                best, best_len = bid, m
        if best is not None:
            self._ref(best)
            table.blocks.append(best)
            n += best_len
            if best_len == bs:  # a full block (an uncached twin) found through the tail index
                table.hashes.append(self.hash_fn(prefix, self.blocks[best].token_ids))
        table.num_tokens = n
        return table

    # ---- growing, writing, shrinking ------------------------------------------------------------
    def reserve(self, table: BlockTable, new_len: int) -> None:
        """Make positions table.num_tokens..new_len-1 writable (copy-on-write, new blocks)."""
        if self.blocks_needed(table, new_len) > self.num_free:
            raise PoolExhaustedError(
                f"need {self.blocks_needed(table, new_len)} blocks, {self.num_free} free"
            )
        bs = self.block_size
        pos = table.num_tokens
        if new_len > pos and pos % bs:
            i = pos // bs
            old = self.blocks[table.blocks[i]]
            if old.ref_count > 1:
                new = self._take()
                new.token_ids = old.token_ids[: pos % bs]
                new.prefix_hash = old.prefix_hash
                self.copies.append((old.id, new.id))
                self._unref(old.id)
                table.blocks[i] = new.id
            else:
                self._unregister(old)
                del old.token_ids[pos % bs :]
        while len(table.blocks) * bs < new_len:
            table.blocks.append(self._take().id)

    def slots(self, table: BlockTable, start: int, count: int) -> list[int]:
        bs = self.block_size
        return [table.blocks[p // bs] * bs + p % bs for p in range(start, start + count)]

    def commit(self, table: BlockTable, tokens: Sequence[int]) -> None:
        """Record that `tokens` were written at table.num_tokens.. (after `reserve`); register full blocks."""
        bs = self.block_size
        for tok in tokens:
            pos = table.num_tokens
            blk = self.blocks[table.blocks[pos // bs]]
            if len(blk.token_ids) != pos % bs or blk.ref_count != 1:
                raise AssertionError(f"block {blk.id} is not writable at position {pos}")
            if pos % bs == 0:
                blk.prefix_hash = table.prefix_hash(pos // bs)
            blk.token_ids.append(tok)
            table.num_tokens += 1
            if len(blk.token_ids) == bs:
                h = self.hash_fn(blk.prefix_hash, blk.token_ids)
                table.hashes.append(h)
                if h not in self.cached:  # a block with the same contents may already be cached
                    blk.hash = h
                    self.cached[h] = blk.id
                    self._index(blk)

    def fork(self, table: BlockTable) -> BlockTable:
        for bid in table.blocks:
            if bid != HOLE:
                self._ref(bid)
        return BlockTable(list(table.blocks), table.num_tokens, list(table.hashes))

    def truncate(self, table: BlockTable, length: int) -> None:
        """Keep positions < length; whole blocks past it go back to the pool, including blocks reserved past
        the last written position (`truncate(table, table.num_tokens)` returns unused reservations)."""
        if length > table.num_tokens:
            return
        bs = self.block_size
        keep = -(-length // bs)
        for bid in table.blocks[keep:]:
            if bid != HOLE:
                self._unref(bid)
        del table.blocks[keep:]
        del table.hashes[length // bs :]
        table.num_tokens = length
        if length % bs:
            last = self.blocks[table.blocks[-1]]
            if last.ref_count == 1:  # sole owner: drop the stale tail now; shared blocks copy on write
                self._unregister(last)
                del last.token_ids[length % bs :]

    def free(self, table: BlockTable) -> None:
        for bid in reversed(table.blocks):  # the tail is freed first, so it is evicted first
            if bid != HOLE:
                self._unref(bid)
        table.blocks.clear()
        table.hashes.clear()
        table.num_tokens = 0

    def release_before(self, table: BlockTable, position: int) -> None:
        """Give back the blocks wholly before `position` (their entries become HOLE): a sliding-window
        layer never reads them again."""
        for i in range(min(position // self.block_size, len(table.blocks))):
            if table.blocks[i] != HOLE:
                self._unref(table.blocks[i])
                table.blocks[i] = HOLE

    # ---- internals ------------------------------------------------------------------------------
    def _take(self) -> Block:
        if self.empty:
            bid, _ = self.empty.popitem(last=False)
        elif self.evictable:
            bid, _ = self.evictable.popitem(last=False)
            self.evictions += 1
        else:
            raise PoolExhaustedError("no free KV blocks")
        blk = self.blocks[bid]
        self._unregister(blk)
        blk.token_ids = []
        blk.prefix_hash = ROOT_HASH
        blk.ref_count = 1
        return blk

    def _ref(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count == 0:
            self.evictable.pop(bid, None)
            self.empty.pop(bid, None)
        blk.ref_count += 1

    def _unref(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count <= 0:
            raise AssertionError(f"block {bid} freed twice")
        blk.ref_count -= 1
        if blk.ref_count == 0:
            if blk.token_ids:
                self._index(blk)  # a partly filled tail becomes findable for the next turn
                self.evictable[bid] = None
            else:
                self.empty[bid] = None

    def _index(self, blk: Block) -> None:
        if not blk.indexed:
            self.by_prefix.setdefault(blk.prefix_hash, set()).add(blk.id)
            blk.indexed = True

    def _unregister(self, blk: Block) -> None:
        if blk.hash is not None:
            if self.cached.get(blk.hash) == blk.id:
                del self.cached[blk.hash]
            blk.hash = None
        if blk.indexed:
            ids = self.by_prefix.get(blk.prefix_hash)
            if ids is not None:
                ids.discard(blk.id)
                if not ids:
                    del self.by_prefix[blk.prefix_hash]
            blk.indexed = False

    def check(self) -> None:
        """Assert the allocator's invariants (tests call this after every operation)."""
        for blk in self.blocks:
            free = blk.id in self.empty or blk.id in self.evictable
            assert (blk.ref_count == 0) == free, f"block {blk.id}: refs {blk.ref_count}, free {free}"
            assert not (blk.id in self.empty and blk.id in self.evictable)
            assert len(blk.token_ids) <= self.block_size
            if blk.hash is not None:
                assert self.cached.get(blk.hash) == blk.id and len(blk.token_ids) == self.block_size
            if blk.indexed:
                assert blk.id in self.by_prefix.get(blk.prefix_hash, ())
        for bid in self.empty:
            assert not self.blocks[bid].token_ids and not self.blocks[bid].indexed
