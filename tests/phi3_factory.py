"""Tiny random-weight `phi3` GGUF models (Phi-3 / Phi-3.5 / Phi-4-mini layout) for tests.

The weights are `gguf_factory`'s llama weights for the same seed and shapes, stored as phi3 stores them:
Q, K and V as one `attn_qkv` matrix, gate and up as one `ffn_up` matrix (gate rows first), and optionally
what Phi-3.5 / Phi-4-mini add: a rotary width below the head dimension (`rope_dim`), LongRoPE's
`rope_factors_long` / `rope_factors_short` frequency divisors with the original context length they
switch at, and `rope.scaling.attn_factor`. The K-quants go through llama.cpp's quantizer as in
`gguf_factory`. Kept apart from gguf_factory.py, which is past the house limit on module length.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf_factory import (
    _FILE_TYPES,
    _default_vocab_source,
    _embd_qtype,
    _encode,
    _llama_cpp_quantize,
    _random_tensors,
    _tokenizer_kvs,
    quantizer_path,
)


def longrope_factors(rope_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(long, short) divisors per rotary frequency, shaped like Phi-3.5's: short near 1, long growing
    towards the low frequencies (up to ~40x), with some jitter so no two models share them by accident."""
    rng = np.random.default_rng(seed + 1000)
    half = rope_dim // 2
    ramp = np.linspace(0.0, 1.0, half)
    long = np.exp(ramp * np.log(40.0)) * (1.0 + 0.05 * rng.random(half))
    short = 1.0 + 0.3 * ramp + 0.05 * rng.random(half)
    return long.astype(np.float32), short.astype(np.float32)


def _phi3_tensors(t: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"token_embd.weight": t["token_embd.weight"]}
    for i in range(n_layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = t[p + "attn_norm.weight"]
        out[p + "attn_qkv.weight"] = np.concatenate([t[p + f"attn_{x}.weight"] for x in "qkv"])
        out[p + "attn_output.weight"] = t[p + "attn_output.weight"]
        out[p + "ffn_norm.weight"] = t[p + "ffn_norm.weight"]
        out[p + "ffn_up.weight"] = np.concatenate([t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]])
        out[p + "ffn_down.weight"] = t[p + "ffn_down.weight"]
    out["output_norm.weight"] = t["output_norm.weight"]
    if "output.weight" in t:
        out["output.weight"] = t["output.weight"]
    return out


def _write(path: Path, tensors: dict[str, np.ndarray], qtype: str, meta: dict[str, Any]) -> None:
    w = gguf.GGUFWriter(path, "phi3")
    w.add_type("model")
    # not "phi3" in the name: llama.cpp then expects Phi-3's own special tokens in the vocabulary
    w.add_name(f"tiny-fused-{qtype}")
    w.add_context_length(meta["context_length"])
    w.add_embedding_length(meta["hidden"])
    w.add_block_count(meta["n_layers"])
    w.add_feed_forward_length(meta["ffn"])
    w.add_head_count(meta["n_heads"])
    w.add_head_count_kv(meta["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(meta["rope_theta"])
    w.add_rope_dimension_count(meta["rope_dim"])
    w.add_vocab_size(meta["vocab"])
    if meta["orig_context"]:
        w.add_rope_scaling_orig_ctx_len(meta["orig_context"])
    if meta["attn_factor"] != 1.0:
        w.add_rope_scaling_attn_factors(meta["attn_factor"])
    w.add_sliding_window(0)  # what the converter writes for Phi-4 (llama.cpp ignores the key for phi3)
    w.add_file_type(_FILE_TYPES.get(qtype, gguf.LlamaFileType.ALL_F32))
    if qtype not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub_type in _tokenizer_kvs(str(meta["vocab_from"])):
        w.add_key_value(key, value, vtype, sub_type)
    for name, data in tensors.items():
        if data.ndim == 1:
            w.add_tensor(name, data)
            continue
        tq = _embd_qtype(qtype) if name in ("token_embd.weight", "output.weight") else qtype
        arr, raw_dtype = _encode(data, tq)
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_tiny_phi3(
    path: str | os.PathLike[str],
    *,
    qtype: str = "Q4_0",
    n_layers: int = 2,
    hidden: int = 256,
    ffn: int = 512,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    rope_dim: int | None = None,
    longrope: bool = False,
    orig_context: int = 0,
    attn_factor: float = 1.0,
    tied: bool = True,
    context_length: int = 2048,
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> Path:
    """Write the model to `path`. `rope_dim` defaults to the head dimension; `longrope` adds the factor
    tensors (switching at `orig_context`, which is then required)."""
    head_dim = hidden // n_heads
    rope_dim = rope_dim or head_dim
    if longrope and not orig_context:
        raise ValueError("longrope needs orig_context")
    vocab_from = _default_vocab_source()
    vocab = len(next(v for k, v, *_ in _tokenizer_kvs(str(vocab_from)) if k == "tokenizer.ggml.tokens"))
    base = _random_tensors(
        arch="llama", n_layers=n_layers, hidden=hidden, ffn=ffn, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, vocab=vocab, tied=tied, seed=seed,
    )  # fmt: skip
    tensors = _phi3_tensors(base, n_layers)
    if longrope:
        tensors["rope_factors_long.weight"], tensors["rope_factors_short.weight"] = longrope_factors(
            rope_dim, seed
        )
    meta = dict(
        context_length=context_length, hidden=hidden, n_layers=n_layers, ffn=ffn, n_heads=n_heads,
        n_kv_heads=n_kv_heads, rope_theta=rope_theta, rope_dim=rope_dim, orig_context=orig_context,
        attn_factor=attn_factor, vocab_from=vocab_from, vocab=vocab,
    )  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        if quantizer_path(qtype) == "gguf":
            _write(partial, tensors, qtype, meta)
        else:
            f32 = path.with_name(path.name + ".f32.partial")
            try:
                _write(f32, tensors, "F32", meta)
                _llama_cpp_quantize(f32, partial, qtype)
            finally:
                f32.unlink(missing_ok=True)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def tiny_phi3_cached(directory: Path, **kwargs: Any) -> Path:
    """`build_tiny_phi3` memoized on its arguments in `directory` (one file per configuration)."""
    digest = hashlib.sha1(repr(sorted(kwargs.items())).encode()).hexdigest()[:12]
    path = Path(directory) / f"tiny-phi3-{kwargs.get('qtype', 'Q4_0')}-{digest}.gguf"
    if not path.is_file():
        build_tiny_phi3(path, **kwargs)
    return path
