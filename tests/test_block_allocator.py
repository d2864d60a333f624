"""Block allocator: prefix caching, collisions, copy-on-write, truncate, eviction, invariants."""

from __future__ import annotations

import random

import pytest

from ripelm.runtime.block_allocator import BlockAllocator, BlockTable, PoolExhaustedError

BS = 4


def write(a: BlockAllocator, table: BlockTable, tokens: list[int]) -> None:
    a.reserve(table, table.num_tokens + len(tokens))
    a.commit(table, tokens)
    a.check()


def test_prefix_cache_shares_full_blocks_and_partial_tail():
    a = BlockAllocator(16, BS)
    t1 = BlockTable()
    write(a, t1, list(range(10)))  # blocks: [0-3] [4-7] [8,9]
    assert len(t1.blocks) == 3 and a.num_used == 3
    # While t1 lives, its two full blocks are shared; its partial tail is not findable yet.
    t2 = a.match_prefix(list(range(12)), limit=11)
    assert t2.num_tokens == 8 and t2.blocks == t1.blocks[:2]
    a.free(t2)
    a.free(t1)
    a.check()
    # After t1 ends its tail is cached too: a longer prompt reuses all 10 tokens.
    t3 = a.match_prefix(list(range(14)), limit=13)
    assert t3.num_tokens == 10 and t3.blocks == [0, 1, 2]
    write(a, t3, [10, 11, 12])  # tail block taken over in place (sole owner): no copy
    assert a.copies == [] and t3.blocks[:3] == [0, 1, 2]
    a.free(t3)
    a.check()


def test_match_respects_limit_and_never_includes_last_token():
    a = BlockAllocator(8, BS)
    t1 = BlockTable()
    write(a, t1, [1, 2, 3, 4, 5, 6, 7, 8])
    a.free(t1)
    t2 = a.match_prefix([1, 2, 3, 4, 5, 6, 7, 8], limit=7)
    assert t2.num_tokens == 7  # the last block is used for its first 3 tokens only
    write(a, t2, [8])  # recomputing position 7 writes into the cached block: it is unregistered first
    assert a.cached.get(t2.hashes[-1]) is not None
    a.free(t2)
    a.check()


def test_forced_hash_collision_is_a_miss():
    a = BlockAllocator(8, BS, hash_fn=lambda prefix, tokens: 42)  # every block collides
    t1 = BlockTable()
    write(a, t1, [1, 2, 3, 4])
    a.free(t1)
    t2 = a.match_prefix([9, 9, 9, 9, 9], limit=4)
    assert t2.num_tokens == 0 and t2.blocks == []
    t3 = a.match_prefix([1, 2, 3, 4, 5], limit=4)
    assert t3.num_tokens == 4  # the genuine match still works
    a.free(t3)
    a.check()


def test_fork_copies_shared_partial_block_on_first_write():
    a = BlockAllocator(16, BS)
    parent = BlockTable()
    write(a, parent, list(range(6)))  # [0-3] full, [4,5] partial
    children = [a.fork(parent) for _ in range(3)]
    assert a.num_used == 2
    for i, child in enumerate(children):
        write(a, child, [100 + i])
    assert len(a.copies) == 3  # three writers copied the shared partial block
    write(a, parent, [99])  # the parent is now its sole owner: writes in place
    assert len(a.copies) == 3
    assert a.num_used == 2 + 3
    assert {a.blocks[c.blocks[0]].id for c in children} == {parent.blocks[0]}  # full block still shared
    for t in [parent, *children]:
        a.free(t)
    a.check()
    assert a.num_free == 16


def test_truncate_frees_whole_blocks():
    a = BlockAllocator(16, BS)
    t = BlockTable()
    write(a, t, list(range(11)))
    assert len(t.blocks) == 3
    a.truncate(t, 5)
    a.check()
    assert t.num_tokens == 5 and len(t.blocks) == 2 and a.num_used == 2
    write(a, t, [50, 51, 52])
    assert a.blocks[t.blocks[1]].token_ids == [4, 50, 51, 52]
    a.free(t)
    a.check()


def test_truncate_at_the_end_returns_unwritten_reservations():
    """Speculation reserves room for proposed tokens and commits only the accepted ones."""
    a = BlockAllocator(16, BS)
    t = BlockTable()
    write(a, t, list(range(6)))
    a.reserve(t, 6 + 2 * BS)
    assert len(t.blocks) == 4 and a.num_used == 4
    a.commit(t, [6, 7])
    a.truncate(t, t.num_tokens)
    a.check()
    assert t.num_tokens == 8 and len(t.blocks) == 2 and a.num_used == 2 and len(a.empty) == 14
    assert a.blocks[t.blocks[1]].token_ids == [4, 5, 6, 7]
    a.free(t)
    a.check()


def test_eviction_prefers_empty_blocks_then_oldest_cached():
    a = BlockAllocator(4, BS)
    t1 = BlockTable()
    write(a, t1, list(range(8)))  # two cached blocks
    a.free(t1)
    t2 = BlockTable()
    write(a, t2, [50] * 8)  # takes the two empty blocks, no eviction
    assert a.evictions == 0
    t3 = a.match_prefix(list(range(8)), limit=7)
    assert t3.num_tokens == 7  # still cached
    a.free(t3)
    write(a, t2, [51] * 4)  # needs one more: evicts the oldest cached block
    assert a.evictions == 1
    with pytest.raises(PoolExhaustedError):
        a.reserve(t2, t2.num_tokens + 2 * BS)
    a.free(t2)
    a.check()


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    a = BlockAllocator(40, BS)
    tables: list[tuple[BlockTable, list[int]]] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.3 or not tables:
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
            t = a.match_prefix(prompt, limit=len(prompt) - 1)
            assert (
                prompt[: t.num_tokens]
                == [tok for b in t.blocks for tok in a.blocks[b].token_ids][: t.num_tokens]
            )
            if a.blocks_needed(t, len(prompt)) <= a.num_free:
                a.reserve(t, len(prompt))
                a.commit(t, prompt[t.num_tokens :])
                tables.append((t, prompt))
            else:
                a.free(t)
        elif op < 0.6:
            t, toks = rng.choice(tables)
            new = [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            if a.blocks_needed(t, t.num_tokens + len(new)) <= a.num_free:
                a.reserve(t, t.num_tokens + len(new))
                a.commit(t, new)
                toks.extend(new)
        elif op < 0.7:
            t, toks = rng.choice(tables)
            child = a.fork(t)
            tables.append((child, list(toks)))
        elif op < 0.8:
            t, toks = rng.choice(tables)
            n = rng.randrange(0, t.num_tokens + 1)
            a.truncate(t, n)
            del toks[n:]
        else:
            t, _ = tables.pop(rng.randrange(len(tables)))
            a.free(t)
        a.check()
        for t, toks in tables:  # every table reads back exactly its own tokens
            stored = []
            for i, b in enumerate(t.blocks):
                stored += a.blocks[b].token_ids[: min(BS, t.num_tokens - i * BS)]
            assert stored == toks[: t.num_tokens]
    for t, _ in tables:
        a.free(t)
    a.check()
    assert a.num_free == 40
