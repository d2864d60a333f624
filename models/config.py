"""Architecture configs: turn a validated GGUFFile's metadata into a ModelConfig the engine can build from.

This module owns which architectures ripelm runs (llama-style decoders: llama, mistral, qwen2, qwen3,
gemma3 with its extra norms, GeGLU and interleaved sliding-window layers, and phi3 with its fused QKV and
gate/up matrices, partial rotary and LongRoPE factors) and
checks that every tensor the engine will need is present with the shape the config implies. Which ggml
tensor types the engine can compute with is decided elsewhere (see `unsupported_tensor_types`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ripelm.models.errors import ModelFormatError, UnsupportedModelError
from ripelm.models.gguf_file import GGUFFile

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "config_from_gguf", "required_tensor_shapes"]

# "mistral" is accepted only because it shares llama's tensor layout; the shape check enforces that.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
# architectures whose files keep Q/K in the NEOX rotary layout (llama.cpp ROPE_TYPE_NEOX)
NEOX_ARCHITECTURES = ("qwen2", "qwen3", "gemma3", "phi3")
# llama.cpp builds Gemma 3 with every 6th layer global (full attention) and the rest sliding-window, whose
# RoPE base is 10000 and unscaled; the file stores neither, so they are the architecture's constants.
GEMMA3_SWA_PATTERN = 6
GEMMA3_SWA_ROPE_BASE = 10000.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_dim: int
    rms_eps: float
    context_length: int
    vocab_size: int
    tied_embeddings: bool  # no output.weight: the LM head reuses token_embd.weight
    attn_bias: bool  # q/k/v projections have biases (qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k (qwen3)
    rope_scaling_type: str | None = None  # e.g. "linear", "yarn", "none"
    rope_scaling_factor: float | None = None
    rope_scaling_orig_ctx: int | None = None
    has_rope_freqs: bool = False  # llama3-style rope_freqs.weight (per-dimension frequency factors)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    chat_template: str | None = None
    # gemma3: the embedding is multiplied by embed_scale; post_norms adds RMSNorms on the attention and FFN
    # outputs (post_attention_norm / post_ffw_norm) before the residual add; ffn_act "gelu" is GeGLU with
    # tanh GELU. swa_layers[i] says layer i attends only to the last sliding_window positions (llama.cpp:
    # key p0 is seen from query p1 when p1 - p0 < sliding_window), rotating with rope_theta_swa unscaled.
    # attn_scale, when set, replaces 1/sqrt(head_dim) as the query scale (Gemma 3 27B).
    embed_scale: float = 1.0
    post_norms: bool = False
    ffn_act: str = "silu"
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()
    rope_theta_swa: float | None = None
    attn_scale: float | None = None
    # phi3: Q/K/V stored as one attn_qkv matrix, gate and up as one ffn_up matrix (gate rows first), and
    # LongRoPE: rope_factors_long/short.weight divide the frequencies (long when the run's context exceeds
    # rope_scaling_orig_ctx, as llama.cpp picks them); rope_attn_factor multiplies the rotated dims' cos/sin.
    fused_qkv: bool = False
    fused_gate_up: bool = False
    has_longrope: bool = False
    rope_attn_factor: float = 1.0

    @property
    def neox(self) -> bool:
        return self.arch in NEOX_ARCHITECTURES

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """Build and validate the config. Raises UnsupportedModelError or ModelFormatError naming the problem."""
    md = g.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{g.path}: missing or non-string general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    split_count = md.get("split.count")
    if isinstance(split_count, int) and split_count > 1:
        raise UnsupportedModelError(
            f"split GGUF files ({split_count} parts) are not supported; merge them first"
        )
    expert_count = md.get(f"{arch}.expert_count")
    if isinstance(expert_count, int) and expert_count > 0:
        raise UnsupportedModelError(
            f"mixture-of-experts models ({arch} with {expert_count} experts) are not supported"
        )

    def get_int(key: str, default: int | None = None, minimum: int = 1) -> int:
        v = md.get(key)
        if v is None:
            if default is None:
                raise ModelFormatError(f"missing metadata key '{key}'")
            return default
        if isinstance(v, list | np.ndarray):
            raise UnsupportedModelError(f"per-layer metadata '{key}' is not supported")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelFormatError(f"metadata '{key}' must be an integer, got {_describe(v)}")
        if v < minimum:
            raise ModelFormatError(f"metadata '{key}' = {v} is out of range (must be >= {minimum})")
        return v

    def get_float(key: str, default: float | None = None) -> float:
        v = md.get(key)
        if v is None:
            if default is None:
                raise ModelFormatError(f"missing metadata key '{key}'")
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ModelFormatError(f"metadata '{key}' must be a number, got {_describe(v)}")
        v = float(v)
        if not v > 0 or v == float("inf"):
            raise ModelFormatError(f"metadata '{key}' = {v} is out of range (must be positive and finite)")
        return v

    n_layers = get_int(f"{arch}.block_count")
    # Bound the per-layer work below by what the file holds (9 tensors per layer at least; phi3's fused
    # matrices make it 6).
    if n_layers * (6 if arch == "phi3" else 9) > len(g.tensors):
        raise ModelFormatError(
            f"{arch}.block_count is {n_layers} but the file has only {len(g.tensors)} tensors"
        )
    hidden = get_int(f"{arch}.embedding_length")
    ffn = get_int(f"{arch}.feed_forward_length")
    n_heads = get_int(f"{arch}.attention.head_count")
    n_kv_heads = get_int(f"{arch}.attention.head_count_kv", default=n_heads)
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    if f"{arch}.attention.key_length" in md:
        head_dim = get_int(f"{arch}.attention.key_length")
    else:
        if hidden % n_heads:
            raise ModelFormatError(f"embedding_length {hidden} is not a multiple of head_count {n_heads}")
        head_dim = hidden // n_heads
    value_dim = get_int(f"{arch}.attention.value_length", default=head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"key_length {head_dim} != value_length {value_dim} is not supported")
    if head_dim % 2:
        raise ModelFormatError(f"head dimension {head_dim} is odd; rotary embeddings need an even one")
    rope_dim = get_int(f"{arch}.rope.dimension_count", default=head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise ModelFormatError(
            f"rope.dimension_count {rope_dim} must be even and <= head dimension {head_dim}"
        )
    rope_theta = get_float(f"{arch}.rope.freq_base", default=10000.0)
    rms_eps = get_float(f"{arch}.attention.layer_norm_rms_epsilon")
    context_length = get_int(f"{arch}.context_length")

    tokens = md.get("tokenizer.ggml.tokens")
    embd = g.tensors.get("token_embd.weight")
    if isinstance(tokens, list) and tokens:
        vocab_size = len(tokens)
    elif embd is not None and len(embd.shape) == 2:
        vocab_size = embd.shape[1]
    else:
        raise ModelFormatError(
            "cannot tell the vocabulary size: no tokenizer.ggml.tokens and no token_embd.weight"
        )

    scaling_type = md.get(f"{arch}.rope.scaling.type")
    if scaling_type is not None and not isinstance(scaling_type, str):
        raise ModelFormatError(
            f"metadata '{arch}.rope.scaling.type' must be a string, got {_describe(scaling_type)}"
        )
    scaling_factor = get_float(f"{arch}.rope.scaling.factor") if f"{arch}.rope.scaling.factor" in md else None
    orig_key = f"{arch}.rope.scaling.original_context_length"
    scaling_orig_ctx = get_int(orig_key) if orig_key in md else None

    def token_id(key: str) -> int | None:
        if key not in md:
            return None
        tid = get_int(key, minimum=0)
        if tid >= vocab_size:
            raise ModelFormatError(f"metadata '{key}' = {tid} is outside the vocabulary (size {vocab_size})")
        return tid

    chat_template = md.get("tokenizer.chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ModelFormatError(f"tokenizer.chat_template must be a string, got {_describe(chat_template)}")

    gemma: dict[str, Any] = {}
    if arch == "gemma3":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = md.get(f"{arch}.{key}")
            if cap is not None and cap != 0:
                raise UnsupportedModelError(f"{arch}.{key} = {cap} (logit soft-capping) is not supported")
        window = get_int(f"{arch}.attention.sliding_window")
        pattern = md.get(f"{arch}.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise UnsupportedModelError(f"sliding_window_pattern {_describe(pattern)} is not supported")
        gemma = dict(
            embed_scale=float(np.sqrt(np.float32(hidden))),
            post_norms=True,
            ffn_act="gelu",
            sliding_window=window,
            swa_layers=tuple(i % pattern < pattern - 1 for i in range(n_layers)),
            rope_theta_swa=GEMMA3_SWA_ROPE_BASE,
            # llama.cpp scales 27B's queries by 1/sqrt(hidden / heads); it tells 27B by its 62 layers
            attn_scale=(hidden / n_heads) ** -0.5 if n_layers == 62 else None,
        )

    phi: dict[str, Any] = {}
    if arch == "phi3":
        # llama.cpp runs phi3 with full attention whatever sliding_window says, so the key is ignored
        phi = dict(
            fused_qkv="blk.0.attn_qkv.weight" in g.tensors,
            fused_gate_up=True,
            has_longrope="rope_factors_long.weight" in g.tensors or "rope_factors_short.weight" in g.tensors,
            rope_attn_factor=get_float(f"{arch}.rope.scaling.attn_factor", default=1.0),
        )

    cfg = ModelConfig(
        arch=arch,
        n_layers=n_layers,
        hidden=hidden,
        ffn=ffn,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_dim=rope_dim,
        rms_eps=rms_eps,
        context_length=context_length,
        vocab_size=vocab_size,
        tied_embeddings="output.weight" not in g.tensors,
        # Biases/norms present in another llama-style arch must not be silently ignored.
        attn_bias=arch == "qwen2" or "blk.0.attn_q.bias" in g.tensors,
        qk_norm=arch in ("qwen3", "gemma3") or "blk.0.attn_q_norm.weight" in g.tensors,
        rope_scaling_type=scaling_type,
        rope_scaling_factor=scaling_factor,
        rope_scaling_orig_ctx=scaling_orig_ctx,
        has_rope_freqs="rope_freqs.weight" in g.tensors,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
        chat_template=chat_template,
        **gemma,
        **phi,
    )
    _check_tensors(g, cfg)
    return cfg


def required_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine needs for `cfg`, with its GGUF-order shape (ne[0] first)."""
    h, v = cfg.hidden, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (h, v),
        "output_norm.weight": (h,),
    }
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (h, v)
    if cfg.has_rope_freqs:
        shapes["rope_freqs.weight"] = (cfg.rope_dim // 2,)
    if cfg.has_longrope:
        shapes["rope_factors_long.weight"] = (cfg.rope_dim // 2,)
        shapes["rope_factors_short.weight"] = (cfg.rope_dim // 2,)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        shapes[b + "attn_norm.weight"] = (h,)
        if cfg.fused_qkv:
            shapes[b + "attn_qkv.weight"] = (h, cfg.q_dim + 2 * cfg.kv_dim)
        else:
            shapes[b + "attn_q.weight"] = (h, cfg.q_dim)
            shapes[b + "attn_k.weight"] = (h, cfg.kv_dim)
            shapes[b + "attn_v.weight"] = (h, cfg.kv_dim)
        shapes[b + "attn_output.weight"] = (cfg.q_dim, h)
        shapes[b + "ffn_norm.weight"] = (h,)
        if cfg.fused_gate_up:
            shapes[b + "ffn_up.weight"] = (h, 2 * cfg.ffn)
        else:
            shapes[b + "ffn_gate.weight"] = (h, cfg.ffn)
            shapes[b + "ffn_up.weight"] = (h, cfg.ffn)
        shapes[b + "ffn_down.weight"] = (cfg.ffn, h)
        if cfg.attn_bias:
            shapes[b + "attn_q.bias"] = (cfg.q_dim,)
            shapes[b + "attn_k.bias"] = (cfg.kv_dim,)
            shapes[b + "attn_v.bias"] = (cfg.kv_dim,)
        if cfg.post_norms:
            shapes[b + "post_attention_norm.weight"] = (h,)
            shapes[b + "post_ffw_norm.weight"] = (h,)
        if cfg.qk_norm:
            shapes[b + "attn_q_norm.weight"] = (cfg.head_dim,)
            shapes[b + "attn_k_norm.weight"] = (cfg.head_dim,)
    return shapes


def _check_tensors(g: GGUFFile, cfg: ModelConfig) -> None:
    for name, want in required_tensor_shapes(cfg).items():
        t = g.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{cfg.arch} model is missing tensor '{name}'")
        if t.shape != want:
            raise ModelFormatError(
                f"tensor '{name}' has shape {list(t.shape)}, expected {list(want)} for this {cfg.arch} config"
            )
    # A layer index past block_count means the metadata and the tensors disagree about the depth.
    for name in g.tensors:
        if name.startswith("blk."):
            idx = name.split(".", 2)[1]
            if not idx.isdigit() or int(idx) >= cfg.n_layers:
                raise ModelFormatError(f"tensor '{name}' does not belong to any of the {cfg.n_layers} layers")


def _describe(v: Any) -> str:
    if isinstance(v, list | np.ndarray):
        return f"an array of {len(v)}"
    return f"{type(v).__name__} {v!r}"[:80]
