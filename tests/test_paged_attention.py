"""Paged attention: the CPU path and the block-wise online-softmax path against the reference."""

from __future__ import annotations

import pytest
import torch

from ripelm.kernels.attention import DECODE_PAD, attention, decode_attention, decode_bucket
from ripelm.kernels.paged_attention import (
    PagedBatch,
    paged_attention,
    paged_attention_blockwise,
    paged_attention_reference,
    write_kv,
)

KV, H, D, BS, NB = 2, 6, 32, 4, 40


def make_batch(ctx_lens, q_lens, device="cpu", shuffle=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(NB, generator=g).tolist() if shuffle else list(range(NB))
    tables, used = [], 0
    for n in ctx_lens:
        k = -(-n // BS)
        tables.append(order[used : used + k])
        used += k
    return PagedBatch(BS, tables, q_lens, ctx_lens, device=torch.device(device))


def random_pools(dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(NB, BS, KV, D, generator=g).to(dtype=dtype, device=device)
    v = torch.randn(NB, BS, KV, D, generator=g).to(dtype=dtype, device=device)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "ctx_lens,q_lens",
    [([9], [1]), ([9], [9]), ([13], [5]), ([5, 17, 1, 8], [1, 1, 1, 1]), ([6, 12, 3], [6, 2, 1])],
)
def test_paths_agree_with_reference(dtype, ctx_lens, q_lens):
    batch = make_batch(ctx_lens, q_lens)
    kp, vp = random_pools(dtype)
    q = torch.randn(batch.num_rows, H, D).to(dtype)
    ref = paged_attention_reference(q, kp, vp, batch).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (paged_attention(q, kp, vp, batch).float() - ref).abs().max() < tol
    assert (paged_attention_blockwise(q, kp, vp, batch).float() - ref).abs().max() < tol


def test_write_then_attend_matches_contiguous_attention():
    """Keys written through slot mappings read back as the same history a contiguous cache would hold."""
    torch.manual_seed(0)
    n = 11
    batch = make_batch([n], [n])
    kp = torch.zeros(NB, BS, KV, D)
    vp = torch.zeros_like(kp)
    k, v, q = torch.randn(n, KV, D), torch.randn(n, KV, D), torch.randn(n, H, D)
    write_kv(kp, vp, batch.slot_mapping, k, v)
    out = paged_attention(q, kp, vp, batch)
    want = attention(q, k.transpose(0, 1), v.transpose(0, 1), 0)
    assert torch.equal(out, want)


def test_consecutive_blocks_are_read_without_a_copy():
    batch = make_batch([10], [4], shuffle=False)
    assert isinstance(batch.multi[0][3], slice)
    shuffled = make_batch([10], [4], shuffle=True, seed=3)
    assert not isinstance(shuffled.multi[0][3], slice)


def test_batch_does_not_change_a_sequence_result():
    """A sequence's attention output is bitwise the same alone or batched with others."""
    kp, vp = random_pools(torch.bfloat16)
    batch = make_batch([7, 15, 3], [1, 1, 1], seed=5)
    q = torch.randn(3, H, D).bfloat16()
    together = paged_attention(q, kp, vp, batch)
    for i in range(3):
        alone = PagedBatch(BS, [batch.block_tables[i]], [1], [batch.ctx_lens[i]])
        assert torch.equal(paged_attention(q[i : i + 1], kp, vp, alone), together[i : i + 1])


def test_decode_rows_match_the_contiguous_cache_bit_for_bit():
    """A decode row through the paged pool (batched with others) equals the contiguous-cache decode."""
    torch.manual_seed(2)
    lens = [7, 15, 3, 33, 64, 65]
    kp, vp = random_pools(torch.bfloat16)
    big_nb = 64
    kp = torch.randn(big_nb, BS, KV, D).bfloat16()
    vp = torch.randn(big_nb, BS, KV, D).bfloat16()
    order = torch.randperm(big_nb).tolist()
    tables, used = [], 0
    for n in lens:
        tables.append(order[used : used + -(-n // BS)])
        used += -(-n // BS)
    batch = PagedBatch(BS, tables, [1] * len(lens), lens)
    q = torch.randn(len(lens), H, D).bfloat16()
    together = paged_attention(q, kp, vp, batch)
    for i, n in enumerate(lens):
        slots = torch.tensor([tables[i][p // BS] * BS + p % BS for p in range(n)])
        k = kp.view(-1, KV, D)[slots].transpose(0, 1)
        v = vp.view(-1, KV, D)[slots].transpose(0, 1)
        buffer_k = torch.zeros(KV, 256, D).bfloat16()  # a contiguous cache buffer longer than the history
        buffer_v = torch.zeros_like(buffer_k)
        buffer_k[:, :n], buffer_v[:, :n] = k, v
        alone = attention(q[i : i + 1], buffer_k, buffer_v, n - 1, length=n)
        assert torch.equal(alone, together[i : i + 1]), i
        assert torch.equal(attention(q[i : i + 1], k, v, n - 1), alone)  # exact-length history too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_ignores_how_far_a_row_is_padded(dtype):
    """The premise of padding a decode group to its longest row: SDPA's masked result for a row does not
    change with the padded length (any multiple of DECODE_PAD), the batch, or what the padding holds."""
    g = torch.Generator().manual_seed(7)
    for n in (1, 31, 33, 100, 511, 513, 1500, 2100):
        q = torch.randn(1, 9, 64, generator=g).to(dtype)
        k = torch.randn(1, 3, n, 64, generator=g).to(dtype)
        v = torch.randn(1, 3, n, 64, generator=g).to(dtype)
        results = []
        for p in {decode_bucket(n), decode_bucket(n) + DECODE_PAD, decode_bucket(n) + 20 * DECODE_PAD, 4096}:
            pad = torch.randn(1, 3, p - n, 64, generator=g).to(dtype)
            kp, vp = torch.cat([k, pad], 2), torch.cat([v, pad], 2)
            other_k = torch.randn(2, 3, p, 64, generator=g).to(dtype)  # batched with two longer rows
            kb, vb = torch.cat([kp, other_k]), torch.cat([vp, other_k])
            qb = torch.cat([q, torch.randn(2, 9, 64, generator=g).to(dtype)])
            results.append(decode_attention(qb, kb, vb, torch.tensor([n, p, p - 5]))[:1])
        assert all(torch.equal(results[0], r) for r in results[1:]), n


def test_bad_batch_is_rejected():
    with pytest.raises(ValueError):
        PagedBatch(BS, [[0]], [1], [5])  # 5 keys do not fit one block of 4
    with pytest.raises(ValueError):
        PagedBatch(BS, [[0, 1]], [3], [2])  # more queries than keys


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blockwise_on_cuda_matches_reference():
    batch = make_batch([5, 17, 30, 2], [1, 4, 1, 2], device="cuda")
    kp, vp = random_pools(torch.bfloat16, device="cuda")
    q = torch.randn(batch.num_rows, H, D, device="cuda").bfloat16()
    ref = paged_attention_reference(q.cpu(), kp.cpu(), vp.cpu(), make_batch([5, 17, 30, 2], [1, 4, 1, 2]))
    got = paged_attention_blockwise(q, kp, vp, batch).cpu()
    assert (got.float() - ref.float()).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_lone_decode_step_reads_the_pool_in_place_like_the_general_path(dtype):
    """`PagedStep` reads a lone sequence's consecutive blocks through views kept across steps; every layer
    must write the new row and attend exactly as `write_kv` + `paged_attention` do, and a longer history
    (a new block run) must not reuse the old views."""
    from ripelm.runtime.kv_cache import PagedKVCache

    layers = 3
    cache = PagedKVCache(layers, NB, KV, D, block_size=BS, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(dtype))
    for n in (7, 8, 9, 30):  # 9 starts a third block of 4; 30 an eighth
        batch = PagedBatch(BS, [list(range(2, 2 + -(-n // BS)))], [1], [n], num_blocks=NB)
        step = cache.step(batch)
        assert step.lone is not None
        for layer in range(layers):
            q = torch.randn(1, H, D, generator=g).to(dtype)
            k_new, v_new = (
                torch.randn(1, KV, D, generator=g).to(dtype),
                torch.randn(1, KV, D, generator=g).to(dtype),
            )
            kp, vp = cache.k[layer].clone(), cache.v[layer].clone()
            write_kv(kp, vp, batch.slot_mapping, k_new, v_new)
            expected = paged_attention(q, kp, vp, PagedBatch(BS, batch.block_tables, [1], [n], num_blocks=NB))
            assert torch.equal(step.attend(layer, q, k_new, v_new), expected), (n, layer)
            assert torch.equal(cache.k[layer], kp) and torch.equal(cache.v[layer], vp)
