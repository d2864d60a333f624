"""The transformer forward for llama-family GGUF models (llama, qwen2, qwen3, phi3) and Gemma 3.

A plain `nn.Module`: RMSNorm, fused QKV projection (with Qwen2's biases and Qwen3's per-head Q/K norms),
RoPE in the layout the file stores, grouped-query attention through a KV cache object, SwiGLU with a
fused gate/up projection, and a tied or separate output head. Gemma 3 adds a scaled embedding, norms on
the attention and FFN outputs, GeGLU, and sliding-window layers with their own RoPE base (those attend
through the cache's `attend_window`). The residual stream and norms run in
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

# Head rows recomputed in float32: every token whose bf16 logit is within REFINE_MARGIN of the best (the
# packed head's error is well under 0.5); a position with more than REFINE_MAX such tokens (a flat
# distribution) gets its top REFINE_MAX // 4 only.
REFINE_MARGIN = 1.0
REFINE_MAX = 64


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
    post_attn_norm: torch.Tensor | None = None  # gemma3
    post_ffn_norm: torch.Tensor | None = None


class ScaledEmbedding(nn.Module):
    """Gemma's embedding: the table's rows times a constant (sqrt(hidden)), in float32."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(tokens).float() * self.scale


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
        self.swa = cfg.is_swa(index)
        self.window = cfg.sliding_window if self.swa else None
        self.ffn_act_gelu = cfg.ffn_act == "gelu"
        self.gemma = cfg.post_norms or cfg.ffn_act != "silu" or cfg.attn_scale is not None
        # SDPA divides by sqrt(head_dim); a model with another query scale has its queries rescaled first
        self.q_mul = cfg.attn_scale * cfg.head_dim**0.5 if cfg.attn_scale is not None else None
        self.register_buffer("post_attn_norm", w.post_attn_norm, persistent=False)
        self.register_buffer("post_ffn_norm", w.post_ffn_norm, persistent=False)
        self._cache_weights()

    def forward(
        self, x: torch.Tensor, rope: RopeTables, cache: KVCacheLike, dtype: torch.dtype
    ) -> torch.Tensor:
        # Decoding runs this 30 times per token on one row, where each extra tensor op or module lookup
        # costs about a microsecond: weights are read from plain attributes (`_w`), conversions are
        # left to type promotion, and Q and K are rotated and cast together.
        if self.gemma:
            return self._forward_gemma(x, rope, cache, dtype)
        attn_norm, ffn_norm, q_norm, k_norm, wqkv, wo, w_gate_up, w_down = self._w
        t, h, kv, d = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = wqkv(rms_norm(x, attn_norm, self.eps))
        qk_end = self.q_size + self.kv_size
        if q_norm is None:
            # Q and K rotate together: one pass over [T, H + KV, D].
            qk = rope.apply(qkv[:, :qk_end].view(t, h + kv, d).float()).to(dtype)
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = rms_norm(qkv[:, : self.q_size].view(t, h, d).float(), q_norm, self.eps)
            k = rms_norm(qkv[:, self.q_size : qk_end].view(t, kv, d).float(), k_norm, self.eps)
            q, k = rope.apply(q).to(dtype), rope.apply(k).to(dtype)
        v = qkv[:, qk_end:].view(t, kv, d).to(dtype)
        x = x + wo(cache.attend(self.index, q, k, v).reshape(t, self.q_size))  # bf16 promotes to float32
        gate, up = w_gate_up(rms_norm(x, ffn_norm, self.eps)).view(t, 2, self.ffn).unbind(1)
        return x + w_down(F.silu(gate).mul_(up))

    def _forward_gemma(
        self, x: torch.Tensor, rope: RopeTables, cache: KVCacheLike, dtype: torch.dtype
    ) -> torch.Tensor:
        """Gemma 3's layer: norms before and after attention and the FFN, GeGLU (tanh GELU)."""
        attn_norm, ffn_norm, q_norm, k_norm, wqkv, wo, w_gate_up, w_down = self._w
        t, h, kv, d, eps = x.shape[0], self.n_heads, self.n_kv, self.head_dim, self.eps
        qkv = wqkv(rms_norm(x, attn_norm, eps))
        qk_end = self.q_size + self.kv_size
        q = qkv[:, : self.q_size].view(t, h, d).float()
        k = qkv[:, self.q_size : qk_end].view(t, kv, d).float()
        if q_norm is not None:
            q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
        q, k = rope.apply(q), rope.apply(k)
        if self.q_mul is not None:
            q = q * self.q_mul
        q, k, v = q.to(dtype), k.to(dtype), qkv[:, qk_end:].view(t, kv, d).to(dtype)
        if self.window is None:
            a = cache.attend(self.index, q, k, v)
        else:
            a = cache.attend_window(self.index, q, k, v, self.window)  # type: ignore[attr-defined]
        o = wo(a.reshape(t, self.q_size)).float()
        if self.post_attn_norm is not None:
            o = rms_norm(o, self.post_attn_norm, eps)
        x = x + o
        gate, up = w_gate_up(rms_norm(x, ffn_norm, eps)).view(t, 2, self.ffn).unbind(1)
        act = F.gelu(gate.float(), approximate="tanh") if self.ffn_act_gelu else F.silu(gate.float())
        y = w_down((act * up.float()).to(dtype)).float()
        if self.post_ffn_norm is not None:
            y = rms_norm(y, self.post_ffn_norm, eps)
        return x + y

    def _cache_weights(self) -> None:
        self._w = (
            self.attn_norm,
            self.ffn_norm,
            self.q_norm,
            self.k_norm,
            self.wqkv,
            self.wo,
            self.w_gate_up,
            self.w_down,
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self._cache_weights()
        return out


class ForwardInterrupted(Exception):
    """A forward stopped early at its caller's request (a cancelled prefill)."""


class RopeTables:
    """Rotations for one forward's positions, applied to [T, heads, head_dim] float32 tensors.

    Full-width RoPE runs as one complex multiply (pairs (2i, 2i+1) for the interleaved layout; the NEOX
    halves are viewed as pairs first); partial RoPE takes the general path in `ripelm.kernels.rope`.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, neox: bool, head_dim: int):
        self.cos, self.sin, self.neox = cos, sin, neox
        self.full = 2 * cos.shape[-1] == head_dim
        if self.full:
            self.cis = torch.complex(cos, sin)[:, None, :]  # [T, 1, D/2]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not self.full:
            return apply_rope(x, self.cos, self.sin, self.neox)
        t, n, d = x.shape
        if self.neox:
            pairs = x.view(t, n, 2, d // 2).transpose(-1, -2).contiguous()
            out = torch.view_as_real(torch.view_as_complex(pairs) * self.cis)
            return out.transpose(-1, -2).reshape(t, n, d)
        out = torch.view_as_real(torch.view_as_complex(x.view(t, n, d // 2, 2)) * self.cis)
        return out.view(t, n, d)


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
        self.embed = embed if cfg.embed_scale == 1.0 else ScaledEmbedding(embed, cfg.embed_scale)
        self.layers = nn.ModuleList(Block(cfg, w, i) for i, w in enumerate(layers))
        self.register_buffer("output_norm", output_norm, persistent=False)
        self.output = output
        self.head_rows = head_rows  # float32 rows of the output head by token id, for `_refine_top`
        self.native = None  # NativeWeights when the native CPU step runs this model (set by the loader)
        # llama.cpp: llama-family files are permuted for interleaved RoPE; qwen2/qwen3/gemma3/phi3 use NEOX
        # halves. phi3's LongRoPE attn_factor scales the rotated dims' cos and sin (so Q and K) as ggml does.
        self.neox = cfg.neox
        self.rope_mscale = cfg.rope_attn_factor
        self.pos_scale = (
            1.0 / cfg.rope_scaling_factor
            if cfg.rope_scaling_type == "linear" and cfg.rope_scaling_factor
            else 1.0
        )
        self.inv_freq = rope_frequencies(cfg.rope_dim, cfg.rope_theta, rope_freq_factors)
        # sliding-window layers' own (unscaled) rotation, when the model has one
        self.inv_freq_swa = (
            rope_frequencies(cfg.rope_dim, cfg.rope_theta_swa) if cfg.rope_theta_swa is not None else None
        )
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_cache_swa: tuple[torch.Tensor, torch.Tensor] | None = None
        self._grow_rope(256)

    def _grow_rope(self, n: int) -> None:
        size = 1 << max(8, (n - 1).bit_length())
        cos, sin = rope_cos_sin(self.inv_freq * self.pos_scale, torch.arange(size))
        if self.rope_mscale != 1.0:
            cos, sin = cos * self.rope_mscale, sin * self.rope_mscale
        self._rope_cache = (cos.to(self.device), sin.to(self.device))
        if self.inv_freq_swa is not None:
            cos, sin = rope_cos_sin(self.inv_freq_swa, torch.arange(size))
            self._rope_cache_swa = (cos.to(self.device), sin.to(self.device))

    def rope_tables(self, positions: torch.Tensor | int, count: int, swa: bool = False) -> RopeTables:
        """Tables for `count` positions: consecutive from an int start, or the given [T] tensor.
        `swa`: the sliding-window layers' rotation (the same as the others' for most models)."""
        top = positions + count if isinstance(positions, int) else int(positions.max()) + 1
        if top > self._rope_cache[0].shape[0]:  # type: ignore[index]
            self._grow_rope(top)
        swa = swa and self._rope_cache_swa is not None
        cos, sin = self._rope_cache_swa if swa else self._rope_cache  # type: ignore[misc]
        if isinstance(positions, int):
            cos, sin = cos[positions : positions + count], sin[positions : positions + count]
        else:
            cos, sin = cos[positions], sin[positions]
        return RopeTables(cos, sin, self.neox, self.cfg.head_dim)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | int,
        cache: KVCacheLike,
        logits_rows: str | torch.Tensor = "last",
        interrupt: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """tokens int64 [T]; positions int64 [T] or the int start of consecutive ones.

        Returns float32 logits for the last row, all rows, or the given rows. `interrupt` is polled
        between layers; when it returns True the forward stops with `ForwardInterrupted` (the cache may
        then hold partly written rows the caller must not use).
        """
        x = self.embed(tokens).float()
        ropes = [self.rope_tables(positions, tokens.shape[0])]
        if self.inv_freq_swa is not None:
            ropes.append(self.rope_tables(positions, tokens.shape[0], swa=True))
        for layer in self.layers:
            if interrupt is not None and interrupt():
                raise ForwardInterrupted
            x = layer(x, ropes[layer.swa and len(ropes) > 1], cache, self.dtype)
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
        tie or swap. Redoing the few rows near the top from the file's weights costs microseconds.
        """
        near = logits >= logits.amax(-1, keepdim=True) - REFINE_MARGIN
        flat = near.sum(-1) > REFINE_MAX  # decided per position, so a row's result never depends on its batch
        if bool(flat.any()):
            top = torch.zeros_like(near).scatter_(-1, logits.topk(REFINE_MAX // 4, dim=-1).indices, True)
            near = torch.where(flat[:, None], top, near)
        t_idx, v_idx = near.nonzero(as_tuple=True)
        rows = self.head_rows(v_idx).to(h.device)  # type: ignore[misc]
        # Dot products in float64: how torch splits the reduction can depend on how many candidates there
        # are; in float64 that never shows after rounding to float32, so batching cannot flip an argmax.
        acc = torch.float32 if h.device.type == "mps" else torch.float64  # MPS has no float64
        logits[t_idx, v_idx] = (rows.to(acc) * h[t_idx].to(acc)).sum(-1).float()
        return logits
