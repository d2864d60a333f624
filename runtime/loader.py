"""Turn a validated GGUF file into a `Transformer` whose weights stay quantized.

Q4_0/Q4_1/Q4_K and ternary TQ1_0/TQ2_0 matrices become packed int4 layers (codes unchanged), Q8_0
becomes two exact 4-bit halves on the same kernel, the rest (F32/F16/BF16/Q5_K/Q6_K...) dense in the
compute dtype. Projections that read the same input (Q/K/V, gate/up) are fused into one matmul when
their formats allow.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ripelm.kernels.dequant import dequantize, dequantize_rows, q4_codes_scales_offsets, q8_0_as_two_q4
from ripelm.kernels.packed_linear import (
    ConcatLinear,
    DenseLinear,
    Int4Codes,
    Int4Linear,
    SplitInt8Linear,
    int4_shape_ok,
)
from ripelm.models.config import ModelConfig, config_from_gguf
from ripelm.models.errors import UnsupportedModelError
from ripelm.models.gguf_file import GGUFFile, unsupported_tensor_types
from ripelm.models.quant_types import QuantType
from ripelm.runtime.model import LayerWeights, Transformer

INT4_TYPES = {QuantType.Q4_0, QuantType.Q4_1, QuantType.Q4_K, QuantType.TQ1_0, QuantType.TQ2_0}
DENSE_TYPES = {
    QuantType.F32,
    QuantType.F16,
    QuantType.BF16,
    QuantType.Q5_0,
    QuantType.Q5_1,
    QuantType.Q5_K,
    QuantType.Q6_K,
}
SUPPORTED_TYPES = {int(t) for t in INT4_TYPES | DENSE_TYPES | {QuantType.Q8_0}}


@dataclass
class _Matrix:
    """One 2-D weight as read from the file, before it becomes a layer."""

    name: str
    qtype: QuantType
    shape: tuple[int, int]  # torch order [out, in]
    raw: np.ndarray  # the tensor's bytes, memory-mapped from the file

    def int4(self) -> Int4Codes:
        p = q4_codes_scales_offsets(self.raw, int(self.qtype), self.shape)
        return Int4Codes(p.codes, p.scale, p.offset, p.group_size)

    def dense(self) -> torch.Tensor:
        return dequantize(self.raw, int(self.qtype), self.shape)


class QuantizedEmbedding(nn.Module):
    """Token embedding lookup that dequantizes only the requested rows of the file's table."""

    def __init__(self, m: _Matrix, device: torch.device):
        super().__init__()
        self.m = m
        self.device = device
        self.raw = _mapped_tensor(m.raw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.raw, int(self.m.qtype), self.m.shape, tokens.cpu())
        return rows.to(self.device)


def _mapped_tensor(raw: np.ndarray) -> torch.Tensor:
    """A torch view of read-only mapped file bytes, made once so per-token lookups do not re-wrap it."""
    with warnings.catch_warnings():
        # torch warns that the array is not writable; nothing ever writes through this view.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw)


def _linear(
    parts: list[_Matrix], bias: list[torch.Tensor] | None, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """One layer computing the outputs of `parts` side by side; one fused matmul if they share a format."""
    b = torch.cat(bias) if bias else None
    kinds = {_kind(p) for p in parts}
    if len(kinds) > 1:
        return ConcatLinear(
            [_linear([p], None if bias is None else [bias[i]], dtype, device) for i, p in enumerate(parts)]
        )
    kind = kinds.pop()
    if kind.startswith("int4"):
        codes = [p.int4() for p in parts]
        q = codes[0] if len(codes) == 1 else Int4Codes.cat(codes)
        return Int4Linear(q, b, dtype=dtype, device=device, dense_weight=_dense_source(parts, dtype))
    if kind == "q8_0":
        return SplitInt8Linear(
            _q8_0_shards(parts), b, dtype=dtype, device=device, dense_weight=_dense_source(parts, dtype)
        )
    return DenseLinear(torch.cat([p.dense() for p in parts]), b, dtype=dtype, device=device)


def _q8_0_shards(parts: list[_Matrix], rows: int = 4096) -> Iterator[tuple[Int4Codes, Int4Codes]]:
    """Q8_0 weights as exact 4-bit halves, a few thousand rows at a time so unpacking stays small."""
    for p in parts:
        n, k = p.shape
        row_bytes = p.raw.nbytes // n
        for i in range(0, n, rows):
            m = min(rows, n - i)
            high, low = q8_0_as_two_q4(p.raw[i * row_bytes : (i + m) * row_bytes], (m, k))
            yield Int4Codes(*high), Int4Codes(*low)


def _dense_source(parts: list[_Matrix], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Rebuilds the stacked float weight from the mapped file bytes (the dense prefill path)."""
    raws = [(_mapped_tensor(p.raw), int(p.qtype), p.shape) for p in parts]

    def weight() -> torch.Tensor:
        return torch.cat([dequantize(r, q, shape).to(dtype) for r, q, shape in raws])

    return weight


def _kind(m: _Matrix) -> str:
    """How a matrix will be held: int4 (with its group size), split Q8_0, or dense."""
    n, k = m.shape
    if m.qtype in INT4_TYPES:
        group = 256 if m.qtype in (QuantType.TQ1_0, QuantType.TQ2_0) else 32
        if int4_shape_ok(n, k, group):
            return f"int4/{group}"
    if m.qtype == QuantType.Q8_0 and int4_shape_ok(n, 2 * k, 32):
        return "q8_0"
    return "dense"


def check_supported(g: GGUFFile) -> ModelConfig:
    """Config of a model the native engine can run; UnsupportedModelError naming what it cannot."""
    cfg = config_from_gguf(g)
    bad = unsupported_tensor_types(g, SUPPORTED_TYPES)
    if bad:
        kinds = sorted({t for _, t in bad})
        raise UnsupportedModelError(
            f"native engine does not support tensor type(s) {', '.join(kinds)} (e.g. {bad[0][0]})"
        )
    if cfg.rope_scaling_type not in (None, "none", "linear"):
        raise UnsupportedModelError(f"native engine does not support rope scaling '{cfg.rope_scaling_type}'")
    return cfg


def run_context(cfg: ModelConfig, n_ctx: int | None) -> int:
    """The context window a model runs with: the asked one (default 4096) within what the model allows."""
    return min(n_ctx or 4096, cfg.context_length)


def qkv_names(cfg: ModelConfig, i: int) -> list[str]:
    """Layer i's Q/K/V projection tensors: phi3's fused attn_qkv, or Q, K and V apart."""
    p = f"blk.{i}."
    return [p + "attn_qkv.weight"] if cfg.fused_qkv else [p + f"attn_{x}.weight" for x in "qkv"]


def gate_up_names(cfg: ModelConfig, i: int) -> list[str]:
    """Layer i's gate and up projections: phi3's one ffn_up (gate rows first, as llama.cpp's fused SwiGLU
    splits it), or the two apart."""
    p = f"blk.{i}."
    return [p + "ffn_up.weight"] if cfg.fused_gate_up else [p + "ffn_gate.weight", p + "ffn_up.weight"]


def rope_factor_name(g: GGUFFile, cfg: ModelConfig, context_length: int) -> str | None:
    """The frequency-divisor tensor the model rotates with at this context, if any: llama3's rope_freqs, or
    phi3's LongRoPE long factors when the context exceeds the original one (else the short ones), as
    llama.cpp chooses them (by the context size, not the position)."""
    if "rope_freqs.weight" in g.tensors:
        return "rope_freqs.weight"
    if not cfg.has_longrope:
        return None
    orig = cfg.rope_scaling_orig_ctx or cfg.context_length
    name = "rope_factors_long.weight" if context_length > orig else "rope_factors_short.weight"
    return name if name in g.tensors else None


def load_transformer(
    g: GGUFFile,
    *,
    device: torch.device,
    dtype: torch.dtype,
    reference: bool = False,
    context_length: int | None = None,
) -> Transformer:
    """The model with packed weights, or with `reference=True` the exact float32 model tests compare to.
    `context_length`: the window it will run with (picks LongRoPE factors; default `run_context`'s)."""
    cfg = check_supported(g)
    context_length = context_length or run_context(cfg, None)
    if reference:
        dtype = torch.float32

    def linear(parts: list[_Matrix], bias: list[torch.Tensor] | None) -> nn.Module:
        if reference:
            b = torch.cat(bias) if bias else None
            return DenseLinear(torch.cat([m.dense() for m in parts]), b, dtype=dtype, device=device)
        return _linear(parts, bias, dtype, device)

    def mat(name: str) -> _Matrix:
        info = g.tensors[name]
        return _Matrix(name, QuantType(info.ggml_type), tuple(info.torch_shape), g.tensor_bytes(name))  # type: ignore[arg-type]

    def vec(name: str) -> torch.Tensor:
        info = g.tensors[name]
        return dequantize(g.tensor_bytes(name), info.ggml_type, info.torch_shape).to(device)

    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        bias = [vec(p + f"attn_{x}.bias") for x in "qkv"] if cfg.attn_bias else None
        layers.append(
            LayerWeights(
                attn_norm=vec(p + "attn_norm.weight"),
                wqkv=linear([mat(name) for name in qkv_names(cfg, i)], bias),
                wo=linear([mat(p + "attn_output.weight")], None),
                ffn_norm=vec(p + "ffn_norm.weight"),
                w_gate_up=linear([mat(name) for name in gate_up_names(cfg, i)], None),
                w_down=linear([mat(p + "ffn_down.weight")], None),
                q_norm=vec(p + "attn_q_norm.weight") if cfg.qk_norm else None,
                k_norm=vec(p + "attn_k_norm.weight") if cfg.qk_norm else None,
                post_attn_norm=vec(p + "post_attention_norm.weight") if cfg.post_norms else None,
                post_ffn_norm=vec(p + "post_ffw_norm.weight") if cfg.post_norms else None,
            )
        )
    embed_m = mat("token_embd.weight")
    head_m = embed_m if cfg.tied_embeddings else mat("output.weight")
    head_raw = _mapped_tensor(head_m.raw)
    factors = rope_factor_name(g, cfg, context_length)
    freq_factors = vec(factors).cpu() if factors else None
    return Transformer(
        cfg,
        QuantizedEmbedding(embed_m, device),
        layers,
        vec("output_norm.weight"),
        linear([head_m], None),
        dtype=dtype,
        device=device,
        rope_freq_factors=freq_factors,
        head_rows=None
        if reference
        else lambda ids: dequantize_rows(head_raw, int(head_m.qtype), head_m.shape, ids),
    )


def load_native_transformer(
    g: GGUFFile,
    weights,  # noqa: ANN001 - NativeWeights
    *,
    dtype: torch.dtype,
    context_length: int | None = None,
) -> Transformer:
    """The model over the native library's repacked weights (`NativeWeights.pack`), on the CPU.

    Decode steps run in C on those weights; the torch modules here (prefill chunks of 32 rows and more)
    dequantize them per call, and the embedding and head rows come from them too, so nothing keeps the
    file's bytes once this returns.
    """
    from ripelm.kernels.native_linear import RepackedEmbedding, RepackedHead, RepackedLinear

    cfg = weights.cfg
    lib = weights.lib
    device = torch.device("cpu")

    def vec(name: str) -> torch.Tensor:
        info = g.tensors[name]
        return dequantize(g.tensor_bytes(name), info.ggml_type, info.torch_shape).float().clone()

    layers = []
    for i, lw in enumerate(weights.layers):
        p = f"blk.{i}."
        # the float vectors are shared by the torch modules and the native step (which reads them in place)
        lw["qkv_bias"] = torch.cat([vec(p + f"attn_{x}.bias") for x in "qkv"]) if cfg.attn_bias else None
        lw["attn_norm"], lw["ffn_norm"] = vec(p + "attn_norm.weight"), vec(p + "ffn_norm.weight")
        lw["q_norm"] = vec(p + "attn_q_norm.weight") if cfg.qk_norm else None
        lw["k_norm"] = vec(p + "attn_k_norm.weight") if cfg.qk_norm else None
        lw["post_attn_norm"] = vec(p + "post_attention_norm.weight") if cfg.post_norms else None
        lw["post_ffn_norm"] = vec(p + "post_ffw_norm.weight") if cfg.post_norms else None
        layers.append(
            LayerWeights(
                attn_norm=lw["attn_norm"],
                wqkv=RepackedLinear(lib, lw["qkv"], lw["qkv_bias"], dtype),
                wo=RepackedLinear(lib, [lw["wo"]], None, dtype),
                ffn_norm=lw["ffn_norm"],
                w_gate_up=RepackedLinear(lib, [lw["gate"], lw["up"]], None, dtype),
                w_down=RepackedLinear(lib, [lw["down"]], None, dtype),
                q_norm=lw["q_norm"],
                k_norm=lw["k_norm"],
                post_attn_norm=lw["post_attn_norm"],
                post_ffn_norm=lw["post_ffn_norm"],
            )
        )
    if weights.embed is not None:
        embed: nn.Module = RepackedEmbedding(lib, weights.embed)
    else:  # a token table of a type the native step does not repack: keep a private copy of its bytes
        info = g.tensors["token_embd.weight"]
        m = _Matrix(
            "token_embd.weight",
            QuantType(info.ggml_type),
            tuple(info.torch_shape),
            np.array(g.tensor_bytes("token_embd.weight")),
        )  # type: ignore[arg-type]
        embed = QuantizedEmbedding(m, device)
    factors = rope_factor_name(g, cfg, context_length or run_context(cfg, None))
    freq_factors = vec(factors) if factors else None
    model = Transformer(
        cfg,
        embed,
        layers,
        vec("output_norm.weight"),
        RepackedHead(weights),
        dtype=dtype,
        device=device,
        rope_freq_factors=freq_factors,
        head_rows=lambda ids: weights.head.rows(lib, ids),
    )
    weights.out_norm = model.output_norm
    weights.inv_freq = (model.inv_freq * model.pos_scale).float().numpy().copy()
    weights.rope_mscale = cfg.rope_attn_factor
    if model.inv_freq_swa is not None:
        weights.inv_freq_swa = model.inv_freq_swa.float().numpy().copy()
    model.native = weights
    return model
