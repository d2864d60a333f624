"""Rotary position embeddings in the two layouts GGUF models use.

`interleaved` rotates adjacent pairs (x[2i], x[2i+1]): llama-family GGUF files store Q/K weights permuted
for this layout (llama.cpp's ROPE_TYPE_NORM). `neox` rotates the two halves (x[i], x[i + d/2]): Qwen2/3
files keep the original layout (llama.cpp's ROPE_TYPE_NEOX).
"""

from __future__ import annotations

import torch


def rope_frequencies(rope_dim: int, theta: float, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [rope_dim // 2] in float64 precision then cast to float32."""
    inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if freq_factors is not None:
        # llama3-style scaling ships per-frequency divisors as the `rope_freqs.weight` tensor.
        inv = inv / freq_factors.double()
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, rope_dim // 2] for integer positions [T]."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.double()[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by cos/sin [T, rope_dim // 2]; dims past rope_dim pass through."""
    half = cos.shape[-1]
    rot = 2 * half
    xr = x[..., :rot]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        a, b = xr[..., :half], xr[..., half:]
        out = torch.cat([a * c - b * s, a * s + b * c], dim=-1)
    else:
        pairs = xr.unflatten(-1, (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    if rot == x.shape[-1]:
        return out
    return torch.cat([out, x[..., rot:]], dim=-1)
