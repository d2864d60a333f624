"""Synthetic GGUF models of real shapes, for benchmarks where a model is memory-bound.

Random weights written directly as valid quantized blocks (random codes, scales sized so activations stay
near unit scale), the bundled model's tokenizer and chat template. Building a 1B-shaped model takes a few
seconds; nothing is quantized from floats in Python. The token table has the bundled tokenizer's 49,152
entries (Llama 3.2 has 128,256 and Qwen2.5 151,936), so the head is smaller than the real models'.

Shapes (`SHAPES`): `llama-1b-q4_0` is Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads, FFN 8192, tied
head) in Q4_0; `qwen2.5-0.5b-q4_k_m` is Qwen2.5-0.5B (hidden 896, 24 layers, 14/2 heads, FFN 4864, Q/K/V
biases) typed as llama.cpp's Q4_K_M makes it: rows of 896 do not split into 256-wide K-quant blocks, so
those tensors fall back to Q5_0 (Q8_0 where Q6_K was due), ffn_down (rows of 4864) is Q4_K and every
other layer's Q6_K, and the token table Q8_0. For GPUs: `llama-2-7b-q4_0` (hidden 4096, 32 layers, 32/32
heads, FFN 11008) in Q4_0 and `llama-3.1-8b-q4_k_m` (hidden 4096, 32 layers, 32/8 heads, FFN 14336) in
Q4_K with Q6_K for half the attn_v and ffn_down; both with a tied head over the bundled vocabulary.
`phi4-mini-q4_k_m` is Phi-4-mini (phi3: hidden 3072, 32 layers, 24/8 heads, FFN 8192, fused QKV and
gate/up, rotary over 96 of 128 head dims, LongRoPE factors switching at 4096, tied head) in Q4_K with
Q6_K for half the ffn_down.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ripelm.models.quant_types import QuantType, block_layout

if TYPE_CHECKING:  # numpy and the writer load only when a model is built (the CLI lists SHAPES)
    import numpy as np

    from ripelm.models.gguf_output import Field

@dataclass(frozen=True)
class Shape:
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    context: int
    rope_theta: float
    attn_bias: bool
    types: Callable[[str, int], QuantType]  # (tensor kind, layer) -> type
    rope_dim: int | None = None  # rotary width (default: the head dimension)
    phi3: bool = False  # fused attn_qkv / ffn_up, LongRoPE factors switching at 4096


def _q4_k_m(kind: str, layer: int) -> QuantType:
    if kind == "token_embd":
        return QuantType.Q8_0
    if kind == "ffn_down":
        return QuantType.Q6_K if layer % 2 == 0 else QuantType.Q4_K
    return QuantType.Q8_0 if kind == "attn_v" and layer % 2 == 0 else QuantType.Q5_0


def _llama_q4_k_m(kind: str, layer: int) -> QuantType:
    """llama.cpp's Q4_K_M for a Llama of 32 layers: Q6_K for half the attn_v and ffn_down (its "more bits"
    layers: the first and last quarters' every other, simplified here to the even layers), else Q4_K."""
    if kind in ("attn_v", "ffn_down") and layer % 2 == 0:
        return QuantType.Q6_K
    return QuantType.Q4_K


SHAPES = {
    "llama-1b-q4_0": Shape(
        "llama", 2048, 16, 32, 8, 8192, 8192, 500000.0, False, lambda k, i: QuantType.Q4_0
    ),
    "qwen2.5-0.5b-q4_k_m": Shape("qwen2", 896, 24, 14, 2, 4864, 32768, 1000000.0, True, _q4_k_m),
    # the GPU benchmarks' shapes (issue: a real CUDA decode path)
    "llama-2-7b-q4_0": Shape(
        "llama", 4096, 32, 32, 32, 11008, 4096, 10000.0, False, lambda k, i: QuantType.Q4_0
    ),
    "llama-3.1-8b-q4_k_m": Shape("llama", 4096, 32, 32, 8, 14336, 8192, 500000.0, False, _llama_q4_k_m),
    "phi4-mini-q4_k_m": Shape(
        "phi3", 3072, 32, 24, 8, 8192, 131072, 10000.0, False, _llama_q4_k_m, rope_dim=96, phi3=True
    ),
}


def _half(x: float) -> bytes:
    return struct.pack("<e", x)


def random_blocks(t: QuantType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Bytes of a random [n, k] weight of type t whose values have a standard deviation near 1/sqrt(k)."""
    import numpy as np

    per, size = block_layout(t)
    blocks = n * (k // per)
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    std = 1.0 / np.sqrt(k)
    if t == QuantType.Q4_0:  # d * (q - 8): std ~ 4.6 d
        raw[:, :2] = np.frombuffer(_half(std / 4.6), np.uint8)
    elif t == QuantType.Q5_0:  # d * (q - 16): std ~ 9.2 d
        raw[:, :2] = np.frombuffer(_half(std / 9.2), np.uint8)
    elif t == QuantType.Q8_0:  # random int8: std ~ 74 d
        raw[:, :2] = np.frombuffer(_half(std / 74), np.uint8)
    elif t == QuantType.Q4_K:  # d * sc * q - dmin * m with 6-bit sc, m: keep sc, m small (low bits only)
        raw[:, :4] = np.frombuffer(_half(std / 60) + _half(std / 60), np.uint8)
        raw[:, 4:16] &= 0x07
    elif t == QuantType.Q6_K:  # d * sc * (q - 32) with int8 sc: small scales
        raw[:, 192:208] = (rng.integers(-8, 9, size=(blocks, 16)) & 0xFF).astype(np.uint8)
        raw[:, 208:210] = np.frombuffer(_half(std / 150), np.uint8)
    return raw.reshape(-1)


def _u32(key: str, value: int) -> Field:
    from ripelm.models.gguf_output import VT, Field

    return Field(key, value, VT.UINT32)


def _f32(key: str, value: float) -> Field:
    from ripelm.models.gguf_output import VT, Field

    return Field(key, value, VT.FLOAT32)


def _str(key: str, value: str) -> Field:
    from ripelm.models.gguf_output import VT, Field

    return Field(key, value, VT.STRING)


def build_synthetic(
    name: str, path: Path, tokenizer_from: Path, seed: int = 0, n_layers: int | None = None
) -> Path:
    """Write the synthetic model `name` (a key of SHAPES) to `path`; returns it. `n_layers` overrides the
    shape's layer count (tests build one-layer models)."""
    import numpy as np

    from ripelm.models.gguf_file import open_gguf
    from ripelm.models.gguf_output import TensorOut, source_fields, write_gguf

    s = SHAPES[name]
    if n_layers is not None:
        s = dataclasses.replace(s, layers=n_layers)
    src = open_gguf(tokenizer_from)  # validated before gguf-py reads it
    try:
        vocab = len(src.metadata["tokenizer.ggml.tokens"])
    finally:
        src.close()
    tok = source_fields(tokenizer_from, prefix="tokenizer.")
    a = s.arch
    head_dim = s.hidden // s.heads
    entries = [
        _str("general.architecture", a),
        _str("general.name", f"synthetic {name}"),
        _u32("general.quantization_version", 2),
        _u32(f"{a}.context_length", s.context),
        _u32(f"{a}.embedding_length", s.hidden),
        _u32(f"{a}.block_count", s.layers),
        _u32(f"{a}.feed_forward_length", s.ffn),
        _u32(f"{a}.attention.head_count", s.heads),
        _u32(f"{a}.attention.head_count_kv", s.kv_heads),
        _u32(f"{a}.rope.dimension_count", s.rope_dim or head_dim),
        _u32(f"{a}.vocab_size", vocab),
        _f32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        _f32(f"{a}.rope.freq_base", s.rope_theta),
        *tok,
    ]
    if s.phi3:
        entries += [
            _u32(f"{a}.rope.scaling.original_context_length", 4096),
            _f32(f"{a}.rope.scaling.attn_factor", 1.19),
        ]
    rng = np.random.default_rng(seed)
    tensors: list[TensorOut] = []

    def matrix(tname: str, kind: str, layer: int, n: int, k: int) -> None:
        t = s.types(kind, layer)
        tensors.append(TensorOut(tname, (k, n), int(t), lambda: random_blocks(t, n, k, rng)))

    def vector(tname: str, n: int, value: float | None = None) -> None:
        make = (
            (lambda: np.full(n, value, np.float32))
            if value is not None
            else (lambda: (rng.standard_normal(n) * 0.1).astype(np.float32))
        )
        tensors.append(TensorOut(tname, (n,), int(QuantType.F32), make))

    q_dim, kv_dim = s.heads * head_dim, s.kv_heads * head_dim
    matrix("token_embd.weight", "token_embd", 0, vocab, s.hidden)
    for i in range(s.layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", s.hidden, 1.0)
        if s.phi3:
            matrix(p + "attn_qkv.weight", "attn_qkv", i, q_dim + 2 * kv_dim, s.hidden)
        else:
            matrix(p + "attn_q.weight", "attn_q", i, q_dim, s.hidden)
            matrix(p + "attn_k.weight", "attn_k", i, kv_dim, s.hidden)
            matrix(p + "attn_v.weight", "attn_v", i, kv_dim, s.hidden)
        if s.attn_bias:
            vector(p + "attn_q.bias", q_dim)
            vector(p + "attn_k.bias", kv_dim)
            vector(p + "attn_v.bias", kv_dim)
        matrix(p + "attn_output.weight", "attn_output", i, s.hidden, q_dim)
        vector(p + "ffn_norm.weight", s.hidden, 1.0)
        if s.phi3:  # gate rows, then up rows
            matrix(p + "ffn_up.weight", "ffn_up", i, 2 * s.ffn, s.hidden)
        else:
            matrix(p + "ffn_gate.weight", "ffn_gate", i, s.ffn, s.hidden)
            matrix(p + "ffn_up.weight", "ffn_up", i, s.ffn, s.hidden)
        matrix(p + "ffn_down.weight", "ffn_down", i, s.hidden, s.ffn)
    vector("output_norm.weight", s.hidden, 1.0)
    if s.phi3:
        half = (s.rope_dim or head_dim) // 2
        long = np.geomspace(1.0, 40.0, half).astype(np.float32)
        short = np.linspace(1.0, 1.3, half).astype(np.float32)
        tensors.append(TensorOut("rope_factors_long.weight", (half,), int(QuantType.F32), lambda: long))
        tensors.append(TensorOut("rope_factors_short.weight", (half,), int(QuantType.F32), lambda: short))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(path, entries, tensors, alignment=32)
    return path
