"""RMSNorm, RoPE and attention fast paths against plain reference formulas."""

import math

import torch

from ripelm.kernels.attention import attention, attention_reference
from ripelm.kernels.rmsnorm import rms_norm, rms_norm_reference
from ripelm.kernels.rope import apply_rope, rope_cos_sin, rope_frequencies


def test_rms_norm():
    x = torch.randn(4, 64)
    w = torch.rand(64)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(rms_norm(x, w, 1e-5), ref, atol=1e-5)
    assert torch.allclose(rms_norm_reference(x, w, 1e-5), ref, atol=1e-5)


def _rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float, neox: bool) -> torch.Tensor:
    t, h, d = x.shape
    out = x.clone()
    for i in range(t):
        for j in range(d // 2):
            ang = pos[i].item() * theta ** (-2 * j / d)
            c, s = math.cos(ang), math.sin(ang)
            a_idx, b_idx = (j, j + d // 2) if neox else (2 * j, 2 * j + 1)
            a, b = x[i, :, a_idx], x[i, :, b_idx]
            out[i, :, a_idx] = a * c - b * s
            out[i, :, b_idx] = a * s + b * c
    return out


def test_rope_layouts_match_reference():
    x = torch.randn(5, 2, 16)
    pos = torch.tensor([0, 1, 7, 100, 4095])
    cos, sin = rope_cos_sin(rope_frequencies(16, 10000.0), pos)
    for neox in (False, True):
        assert torch.allclose(apply_rope(x, cos, sin, neox), _rope_ref(x, pos, 10000.0, neox), atol=1e-4)


def test_rope_interleaved_equals_neox_on_permuted_dims():
    # llama.cpp's converter permutes Q/K rows so interleaved RoPE on the file equals NEOX on the original.
    d = 8
    x = torch.randn(3, 1, d)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # original half-layout index stored at each position
    cos, sin = rope_cos_sin(rope_frequencies(d, 500.0), torch.arange(3))
    inter = apply_rope(x[..., perm], cos, sin, neox=False)
    neox = apply_rope(x, cos, sin, neox=True)[..., perm]
    assert torch.allclose(inter, neox, atol=1e-5)


def test_partial_rope_passes_tail_through():
    x = torch.randn(2, 1, 12)
    cos, sin = rope_cos_sin(rope_frequencies(8, 10000.0), torch.tensor([3, 4]))
    y = apply_rope(x, cos, sin, neox=True)
    assert torch.equal(y[..., 8:], x[..., 8:])


def test_attention_matches_reference_prefill_decode_and_continuation():
    torch.manual_seed(0)
    h, kv, d = 6, 2, 16
    for t, s, start in [(7, 7, 0), (1, 9, 8), (4, 12, 8)]:
        q = torch.randn(t, h, d)
        k, v = torch.randn(kv, s, d), torch.randn(kv, s, d)
        assert torch.allclose(attention(q, k, v, start), attention_reference(q, k, v, start), atol=1e-5)
