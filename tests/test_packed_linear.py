"""Packed int4 / int8 / dense linear layers against their float reference, on real GGUF block data."""

import gguf
import numpy as np
import pytest
import torch

from ripelm.kernels.dequant import dequantize, q4_codes_scales_offsets, q8_0_as_two_q4
from ripelm.kernels.packed_linear import ConcatLinear, DenseLinear, Int4Codes, Int4Linear, SplitInt8Linear


def _quantized(qtype: gguf.GGMLQuantizationType, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return gguf.quants.quantize(w, qtype).reshape(-1).view(np.uint8)


@pytest.mark.parametrize(
    "qname,n,k", [("Q4_0", 96, 256), ("Q4_1", 64, 576), ("TQ1_0", 32, 512), ("TQ2_0", 48, 256)]
)
def test_int4_linear_matches_dequantized_weights(qname, n, k):
    qt = gguf.GGMLQuantizationType[qname]
    raw = _quantized(qt, n, k)
    p = q4_codes_scales_offsets(raw, int(qt), (n, k))
    lin = Int4Linear(Int4Codes(p.codes, p.scale, p.offset, p.group_size), keep_codes=True)
    exact = dequantize(raw, int(qt), (n, k))
    # Only the per-group scale/zero are rounded to bf16; the codes are exact.
    assert (lin.reference_weight() - exact).abs().max() <= 0.02 * exact.abs().max()
    x = torch.randn(5, k)
    y = lin(x).float()
    ref = x.bfloat16().float() @ lin.reference_weight().t()
    assert torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_int4_linear_on_q4_k_blocks():
    # gguf-py cannot quantize Q4_K; random blocks with small finite super-block scales stand in.
    n, k = 16, 512
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(n * k // 256, 144), dtype=np.uint8)
    blocks[:, 0:4] = np.frombuffer(
        np.array([0.01, 0.002] * (n * k // 256), np.float16).tobytes(), np.uint8
    ).reshape(-1, 4)
    raw = blocks.reshape(-1)
    p = q4_codes_scales_offsets(raw, int(gguf.GGMLQuantizationType.Q4_K), (n, k))
    lin = Int4Linear(Int4Codes(p.codes, p.scale, p.offset, p.group_size), keep_codes=True)
    x = torch.randn(3, k)
    ref = x.bfloat16().float() @ lin.reference_weight().t()
    assert torch.allclose(lin(x).float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_row_shards_pack_like_the_whole():
    raw = _quantized(gguf.GGMLQuantizationType.Q4_1, 160, 256)
    p = q4_codes_scales_offsets(raw, int(gguf.GGMLQuantizationType.Q4_1), (160, 256))
    whole = Int4Codes(p.codes, p.scale, p.offset, 32)
    shards = [Int4Codes(p.codes[a:b], p.scale[a:b], p.offset[a:b], 32) for a, b in ((0, 64), (64, 160))]
    x = torch.randn(2, 256)
    assert torch.equal(Int4Linear(whole)(x), Int4Linear(shards)(x))


def test_fused_int4_equals_separate_layers():
    parts = []
    for seed, n in enumerate((64, 32, 32)):
        raw = _quantized(gguf.GGMLQuantizationType.Q4_0, n, 256, seed)
        p = q4_codes_scales_offsets(raw, int(gguf.GGMLQuantizationType.Q4_0), (n, 256))
        parts.append(Int4Codes(p.codes, p.scale, p.offset, p.group_size))
    fused = Int4Linear(Int4Codes.cat(parts))
    x = torch.randn(4, 256)
    sep = torch.cat([Int4Linear(q)(x) for q in parts], dim=-1)
    assert torch.equal(fused(x), sep)


def test_split_q8_0_is_exact_on_int4_kernel():
    n, k = 32, 256
    raw = _quantized(gguf.GGMLQuantizationType.Q8_0, n, k)
    high, low = q8_0_as_two_q4(raw, (n, k))
    exact = dequantize(raw, int(gguf.GGMLQuantizationType.Q8_0), (n, k))
    assert torch.equal(Int4Codes(*high).dequantize() + Int4Codes(*low).dequantize(), exact)
    lin = SplitInt8Linear([(Int4Codes(*high), Int4Codes(*low))], keep_codes=True)
    assert (lin.reference_weight() - exact).abs().max() <= 0.01 * exact.abs().max()
    x = torch.randn(3, k)
    ref = x.bfloat16().float() @ lin.reference_weight().t()
    assert torch.allclose(lin(x).float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_dense_and_concat_linear():
    w = torch.randn(40, 64) * 0.1
    x = torch.randn(3, 64)
    d = DenseLinear(w, torch.ones(40))
    assert torch.allclose(d(x).float(), x @ w.t() + 1, rtol=3e-2, atol=3e-2)
    cat = ConcatLinear([d, DenseLinear(w[:8])])
    assert torch.allclose(cat(x)[:, 40:], d(x)[:, :8] - 1, atol=3e-2)


def test_int4_rejects_group_that_does_not_divide_rows():
    q = Int4Codes(torch.zeros(8, 576, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 2), 288)
    with pytest.raises(ValueError):
        Int4Linear(q)
