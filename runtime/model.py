"""The transformer forward for llama-family GGUF models (llama, qwen2, qwen3).

A plain `nn.Module`: RMSNorm, fused QKV projection (with Qwen2's biases and Qwen3's per-head Q/K norms),
RoPE in the layout the file stores, grouped-query attention through a KV cache object, SwiGLU with a
fused gate/up projection, and a tied or separate output head. The residual stream and norms run in
float32; matmuls take activations in the compute dtype (bf16 on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ripelm.kernels.rmsnorm import rms_norm
from ripelm.kernels.rope import apply_rope, rope_cos_sin, rope_frequencies
from ripelm.models.config import ModelConfig

REFINE_TOP = 16  # head rows recomputed in float32 per position


class KVCacheLike:
    """What the forward needs from a cache: write this step's K/V for a layer and attend over history."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wqkv: nn.Module
    wo: nn.Module
    ffn_norm: torch.Tensor
    w_gate_up: nn.Module
    w_down: nn.Module
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: LayerWeights, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps = cfg.rms_eps
        self.register_buffer("attn_norm", w.attn_norm, persistent=False)
        self.register_buffer("ffn_norm", w.ffn_norm, persistent=False)
        self.register_buffer("q_norm", w.q_norm, persistent=False)
        self.register_buffer("k_norm", w.k_norm, persistent=False)
        self.wqkv, self.wo, self.w_gate_up, self.w_down = w.wqkv, w.wo, w.w_gate_up, w.w_down
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.ffn = cfg.ffn

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        neox: bool,
        cache: KVCacheLike,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.wqkv(rms_norm(x, self.attn_norm, self.eps))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.n_heads, self.head_dim).float()
        k = k.view(t, self.n_kv, self.head_dim).float()
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = apply_rope(q, cos, sin, neox)
        k = apply_rope(k, cos, sin, neox)
        out = cache.attend(
            self.index, q.to(dtype), k.to(dtype), v.reshape(t, self.n_kv, self.head_dim).to(dtype)
        )
        x = x + self.wo(out.reshape(t, self.q_size)).float()
        gate, up = self.w_gate_up(rms_norm(x, self.ffn_norm, self.eps)).split([self.ffn, self.ffn], dim=-1)
        return x + self.w_down(F.silu(gate) * up).float()


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        embed: nn.Module,
        layers: list[LayerWeights],
        output_norm: torch.Tensor,
        output: nn.Module,
        *,
        dtype: torch.dtype,
        device: torch.device,
        rope_freq_factors: torch.Tensor | None = None,
        head_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.embed = embed
        self.layers = nn.ModuleList(Block(cfg, w, i) for i, w in enumerate(layers))
        self.register_buffer("output_norm", output_norm, persistent=False)
        self.output = output
        self.head_rows = head_rows  # float32 rows of the output head by token id, for `_refine_top`
        # llama.cpp: llama-family files are permuted for interleaved RoPE; qwen2/qwen3 use NEOX halves.
        self.neox = cfg.arch in ("qwen2", "qwen3")
        self.pos_scale = (
            1.0 / cfg.rope_scaling_factor
            if cfg.rope_scaling_type == "linear" and cfg.rope_scaling_factor
            else 1.0
        )
        self.inv_freq = rope_frequencies(cfg.rope_dim, cfg.rope_theta, rope_freq_factors)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._grow_rope(256)

    def _grow_rope(self, n: int) -> None:
        size = 1 << max(8, (n - 1).bit_length())
        cos, sin = rope_cos_sin(self.inv_freq * self.pos_scale, torch.arange(size))
        self._rope_cache = (cos.to(self.device), sin.to(self.device))

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rope_cache  # type: ignore[misc]
        top = int(positions.max()) + 1
        if top > cos.shape[0]:
            self._grow_rope(top)
            cos, sin = self._rope_cache  # type: ignore[misc]
        if positions.numel() == 1 or _is_range(positions):
            start = int(positions[0])
            return cos[start : start + positions.numel()], sin[start : start + positions.numel()]
        return cos[positions], sin[positions]

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCacheLike,
        logits_rows: str | torch.Tensor = "last",
    ) -> torch.Tensor:
        """tokens, positions: int64 [T]. Returns float32 logits for the last row, all rows, or given rows."""
        x = self.embed(tokens).float()
        cos, sin = self.rope_tables(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, self.neox, cache, self.dtype)
        if isinstance(logits_rows, str):
            if logits_rows == "last":
                x = x[-1:]
        else:
            x = x[logits_rows]
        h = rms_norm(x, self.output_norm, self.cfg.rms_eps)
        logits = self.output(h).float()
        if self.head_rows is not None:
            logits = self._refine_top(logits, h)
        return logits

    def _refine_top(self, logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Recompute the leading candidates' logits exactly in float32.

        The packed head returns bf16 logits, which are only 0.125 apart near 25: close runners-up would
        tie or swap. Redoing the top few rows from the file's weights costs a few microseconds.
        """
        k = min(REFINE_TOP, logits.shape[-1])
        idx = logits.topk(k, dim=-1).indices  # [T, k]
        rows = self.head_rows(idx.reshape(-1)).to(h.device).view(*idx.shape, -1)  # type: ignore[misc]
        exact = torch.einsum("tkd,td->tk", rows, h)
        return logits.scatter_(-1, idx, exact)


def _is_range(positions: torch.Tensor) -> bool:
    # Positions of one sequence's prefill are consecutive; slicing the table beats a gather.
    n = positions.numel()
    return bool(positions[-1] - positions[0] == n - 1) and (n < 3 or bool((positions.diff() == 1).all()))
