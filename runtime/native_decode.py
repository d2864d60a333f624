"""The engine's CPU step on ripelm's native library: all layers of a small batch of rows in one call.

`NativeWeights.pack` repacks a model's projection and head matrices once at load (from the GGUF blocks,
see kernels/native/repack.c) when the native library is present and the model fits it: llama, qwen2,
qwen3, gemma3 and phi3 layers (phi3's fused ffn_up repacked as its gate and up halves) whose projections
are Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K or the ternary TQ1_0 and TQ2_0, each matrix in its
own type (llama.cpp's Q4_K_M mixes them within a layer: Q, K and V of different types run as three parts
of one output row), with a head of one of those types (a head of a type not listed, F16 say, sends the
whole model to the torch path); the repacked weights are then the model's only copy (runtime/loader.py
`load_native_transformer`). `NativeWeights.runner(cache)` binds them to one engine's paged KV pool;
`NativeRunner.forward` runs every decode step, short prefill chunks, and long ones too on CPUs without
bf16 matrix instructions, with the GIL released. Anything else runs on the torch path, and `notice_once()`
says why.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ripelm.kernels import native_lib
from ripelm.kernels.cpu_features import cpu_has_bf16_matmul
from ripelm.kernels.native_lib import ptr as _ptr
from ripelm.kernels.native_linear import Repacked, WeightArena
from ripelm.kernels.packed_linear import DENSE_MIN_ROWS
from ripelm.models.config import ModelConfig
from ripelm.models.errors import ModelFileChangedError
from ripelm.models.gguf_file import GGUFFile
from ripelm.models.quant_types import BLOCK_LAYOUT, QuantType
from ripelm.runtime.loader import gate_up_names, qkv_names
from ripelm.runtime.model import REFINE_MARGIN, REFINE_MAX, ForwardInterrupted

# GGUF types the native step reads, and the repacked format each becomes.
NATIVE_FORMATS = {
    QuantType.Q4_0: native_lib.FMT_Q4_0,
    QuantType.Q4_1: native_lib.FMT_Q4,
    QuantType.Q4_K: native_lib.FMT_Q4,
    QuantType.Q5_0: native_lib.FMT_Q5,
    QuantType.Q5_1: native_lib.FMT_Q5,
    QuantType.Q5_K: native_lib.FMT_Q5,
    QuantType.Q6_K: native_lib.FMT_Q6,
    QuantType.Q8_0: native_lib.FMT_Q8,
    QuantType.TQ1_0: native_lib.FMT_T2,
    QuantType.TQ2_0: native_lib.FMT_T2,
}
NATIVE_KV_DTYPE = torch.float16  # llama.cpp's KV type; bfloat16 keys measurably cost agreement
MAX_ROWS = DENSE_MIN_ROWS - 1  # rows of one native step; longer prefills take several (or torch's matmuls)
PREFILL_ROWS = 32  # rows per native step of a long prefill (the kernels' tile of activation rows)
_notice_given = False


def _pad_rows(n: int) -> int:
    """Output rows rounded up to the repacked layout's groups of 8 (kernels/native/repack.c)."""
    return (n + 7) // 8 * 8


@dataclass
class NativeWeights:
    """Repacked weights of one model (the only copy in memory), and the float vectors the step reads."""

    cfg: ModelConfig
    lib: ctypes.CDLL
    isa: int
    layers: list[dict] = field(default_factory=list)
    head: Repacked | None = None
    embed: Repacked | None = None  # token_embd when it is the head or repacks too; else None
    out_norm: torch.Tensor | None = None
    inv_freq: np.ndarray | None = None
    inv_freq_swa: np.ndarray | None = None  # sliding-window layers' rotation (Gemma 3), else None
    rope_mscale: float = 1.0  # phi3 LongRoPE's attn_factor on the rotated dims' cos/sin
    scale: float = 1.0

    @staticmethod
    def pack(g: GGUFFile, cfg: ModelConfig, device: torch.device) -> NativeWeights | None:
        """The model's matrices repacked for the native step, or None (the reason goes to `notice_once`)."""
        global _why_not_model
        lib = native_lib.load()
        if lib is None:
            _why_not_model = native_lib.why_not()
            return None
        reason = _unsupported(g, cfg, device)
        if reason:
            _why_not_model = reason
            return None
        _why_not_model = None
        w = NativeWeights(cfg=cfg, lib=lib, isa=native_lib.best_isa(lib))
        with open(g.path, "rb", buffering=0) as f:
            w._pack_all(g, f)
        w.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        return w

    def _pack_all(self, g: GGUFFile, f) -> None:  # noqa: ANN001 - the open model file
        lib, cfg, w = self.lib, self.cfg, self

        arena = WeightArena()

        def pack_into_one(names: list[str], half: int | None = None) -> Repacked:
            """Tensors of one format whose outputs share a row (Q, K, V) into one arena slice one after
            the other (each whole 8-row groups); or one tensor, or its `half` 0 or 1 (phi3 gate/up)."""
            infos = [g.tensors[name] for name in names]
            fmts = {NATIVE_FORMATS[QuantType(info.ggml_type)] for info in infos}
            assert len(fmts) == 1
            shapes = [tuple(info.torch_shape) for info in infos]
            if half is not None:
                shapes = [(n // 2, k) for n, k in shapes]
            sizes = [lib.rl_repacked_size(int(t.ggml_type), *sh) for t, sh in zip(infos, shapes, strict=True)]
            out, at = arena.take(sum(sizes)), 0
            for name, info, size, (n, k) in zip(names, infos, sizes, shapes, strict=True):
                raw = _read_tensor(g, f, name)
                if half is not None:  # whole rows of GGUF blocks: the halves are byte ranges
                    raw = raw[half * (raw.nbytes // 2) : (half + 1) * (raw.nbytes // 2)]
                if lib.rl_repack(int(info.ggml_type), raw.ctypes.data, n, k, out[at:].ctypes.data) != 0:
                    raise ValueError(f"cannot repack {name}")
                at += size
            return Repacked(fmts.pop(), sum(shape[0] for shape in shapes), k, out)

        def pack(name: str) -> Repacked:
            return pack_into_one([name])

        def pack_side_by_side(names: list[str]) -> list[Repacked]:
            """Matrices whose outputs share one row (Q, K, V): fused into one when their formats agree,
            else apart."""
            if len({NATIVE_FORMATS[QuantType(g.tensors[name].ggml_type)] for name in names}) > 1:
                return [pack(name) for name in names]
            return [pack_into_one(names)]

        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            gu = gate_up_names(cfg, i)
            gate, up = (pack(gu[0]), pack(gu[1])) if len(gu) > 1 else (pack_into_one(gu, h) for h in (0, 1))
            w.layers.append(  # "qkv": [fused qkv] or [q, k, v]
                {"qkv": pack_side_by_side(qkv_names(cfg, i)), "wo": pack(p + "attn_output.weight"),
                 "gate": gate, "up": up, "down": pack(p + "ffn_down.weight")}
            )  # fmt: skip
        head_name = _head_name(g, cfg)
        w.head = pack(head_name)
        if head_name == "token_embd.weight":
            w.embed = w.head
        elif QuantType(g.tensors["token_embd.weight"].ggml_type) in NATIVE_FORMATS:
            w.embed = pack("token_embd.weight")

    def runner(self, cache) -> NativeRunner:  # noqa: ANN001 - a PagedKVCache
        return NativeRunner(self, cache)


_why_not_model: str | None = None


def notice_once() -> None:
    """Tell the user once per process that decoding runs on the slower torch path, and why."""
    global _notice_given
    if _notice_given or _why_not_model is None:
        return
    _notice_given = True
    print(f"ripe: native CPU decode step not used ({_why_not_model}); decoding on torch", file=sys.stderr)


def _read_tensor(g: GGUFFile, f, name: str) -> np.ndarray:  # noqa: ANN001 - the open model file
    """A tensor's bytes read from the file (not through the map: mapped pages would count in the process's
    memory until the map is dropped, doubling peak RSS while a model is repacked)."""
    info = g.tensors[name]
    if g.in_memory:
        return np.ascontiguousarray(g.tensor_bytes(name))
    f.seek(info.offset)
    data = np.empty(info.nbytes, dtype=np.uint8)
    if f.readinto(memoryview(data)) != info.nbytes:
        raise ModelFileChangedError(f"{g.path}: the model file ended early while it was read")
    return data


def _head_name(g: GGUFFile, cfg: ModelConfig) -> str:
    return "token_embd.weight" if cfg.tied_embeddings or "output.weight" not in g.tensors else "output.weight"


def _unsupported(g: GGUFFile, cfg: ModelConfig, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"device {device.type}"
    if cfg.arch not in ("llama", "qwen2", "qwen3", "gemma3", "phi3"):
        return f"architecture {cfg.arch}"
    if cfg.arch == "gemma3" and not hasattr(native_lib.load(), "rl_model_set_extras"):
        return "architecture gemma3 (the native library predates it; rebuild it)"
    if cfg.rope_attn_factor != 1.0 and not hasattr(native_lib.load(), "rl_model_set_rope_mscale"):
        return "rope attn_factor (the native library predates it; rebuild it)"
    if cfg.fused_gate_up and cfg.ffn % 8:
        return "a fused gate/up whose halves are not whole 8-row groups"
    if cfg.n_heads % cfg.n_kv_heads:
        return "attention head grouping"
    if cfg.q_dim % 8 or cfg.kv_dim % 8:
        return "Q/K/V widths that are not whole 8-row groups"
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        return "rope dimensions"
    names = [_head_name(g, cfg)]
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        names += [*qkv_names(cfg, i), p + "attn_output.weight", *gate_up_names(cfg, i), p + "ffn_down.weight"]
    for name in names:
        info = g.tensors[name]
        qt = QuantType(info.ggml_type)
        if qt not in NATIVE_FORMATS:
            return f"tensor type {qt.name} ({name})"
        n, k = info.torch_shape
        if k % BLOCK_LAYOUT[qt][0]:  # whole GGUF blocks per row (32, or 256 for K-quants and ternary)
            return f"row length {k} of {name}"
    return None


def _qkv_args(parts: list[Repacked]) -> list[int | None]:
    """(fmt, data) of Q, K, V for rl_model_set_layer: the fused matrix with K and V absent, or each part."""
    if len(parts) == 1:
        return [parts[0].fmt, _ptr(parts[0].data), 0, None, 0, None]
    return [x for p in parts for x in (p.fmt, _ptr(p.data))]


class NativeRunner:
    """The native step bound to one engine's KV pool."""

    def __init__(self, weights: NativeWeights, cache):  # noqa: ANN001 - a PagedKVCache
        cfg = weights.cfg
        lib = weights.lib
        self.weights, self.lib, self.cfg = weights, lib, cfg
        self.threads = torch.get_num_threads()
        # Long prefills: torch's dense matmuls where the CPU multiplies bf16 matrices in hardware (AMX,
        # AVX512-BF16), else native steps of PREFILL_ROWS rows (int8 dot products beat emulated bf16 and
        # fp32 there: Zen 3, bundled model, 2 threads, 512-token prompt: ~450-600 vs ~250 tok/s).
        self.prefills = not cpu_has_bf16_matmul()
        handle = lib.rl_model_new(
            cfg.n_layers,
            cfg.hidden,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.ffn,
            cfg.rope_dim,
            int(cfg.neox),
            cfg.rms_eps,
            weights.scale,
            weights.inv_freq.ctypes.data,
        )
        if not handle:
            raise MemoryError("native step: out of memory")
        self.handle = handle
        self.isa = lib.rl_model_set_isa(handle, weights.isa)
        if weights.rope_mscale != 1.0:
            lib.rl_model_set_rope_mscale(handle, weights.rope_mscale)
        for i, lw in enumerate(weights.layers):
            lib.rl_model_set_layer(
                handle,
                i,
                _ptr(lw["attn_norm"]),
                _ptr(lw["ffn_norm"]),
                _ptr(lw["q_norm"]),
                _ptr(lw["k_norm"]),
                *_qkv_args(lw["qkv"]),
                _ptr(lw["qkv_bias"]),
                lw["wo"].fmt,
                _ptr(lw["wo"].data),
                lw["gate"].fmt,
                _ptr(lw["gate"].data),
                lw["up"].fmt,
                _ptr(lw["up"].data),
                lw["down"].fmt,
                _ptr(lw["down"].data),
            )
        if cfg.post_norms or cfg.ffn_act != "silu" or weights.inv_freq_swa is not None:  # Gemma 3
            if lib.rl_model_set_extras(handle, int(cfg.ffn_act == "gelu"), _ptr(weights.inv_freq_swa)):
                raise MemoryError("native step: out of memory")
            for i, lw in enumerate(weights.layers):
                lib.rl_model_set_layer_extras(
                    handle,
                    i,
                    _ptr(lw["post_attn_norm"]),
                    _ptr(lw["post_ffn_norm"]),
                    cfg.sliding_window or 0 if cfg.is_swa(i) else 0,
                )
        self.vocab = cfg.vocab_size
        self._refine_work = torch.empty(cfg.hidden + 2 * self.vocab, dtype=torch.float32)
        lib.rl_model_set_head(
            handle, _ptr(weights.out_norm), weights.head.fmt, self.vocab, _ptr(weights.head.data)
        )
        if cache.k.dtype not in (torch.bfloat16, torch.float16) or not cache.k.is_contiguous():
            raise ValueError("native step needs a contiguous float16 or bfloat16 KV pool")
        self.cache = cache  # keeps the pool alive while the C side points into it
        layer_stride = cache.k[0].numel()
        lib.rl_model_set_kv(
            handle,
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            layer_stride,
            cache.block_size,
            int(cache.k.dtype == torch.float16),
        )
        self._warm_up()

    def _warm_up(self) -> None:
        """One step of PREFILL_ROWS rows at load, so the first request does not pay for first use (buffers
        sized, pages touched: in a VM the first step of a fresh process took ~100 ms more). It writes the
        first positions of pool blocks 0 and 1, which no sequence owns yet; any later owner overwrites a
        position before it reads it."""
        rows = min(
            PREFILL_ROWS, 2 * self.cache.block_size, self.cache.allocator.num_blocks * self.cache.block_size
        )
        bs = self.cache.block_size
        x = torch.zeros(rows, self.cfg.hidden, dtype=torch.float32)
        self._step(x, list(range(rows)), [list(range(-(-rows // bs)))] * rows, [rows - 1])

    def takes(self, rows: int) -> bool:
        """Whether a forward of this many rows runs here rather than on torch's matmuls."""
        return rows <= MAX_ROWS or self.prefills

    def close(self) -> None:
        if self.handle:
            self.lib.rl_model_free(self.handle)
            self.handle = None

    def __del__(self) -> None:
        self.close()

    def forward(
        self,
        x: torch.Tensor,
        positions: list[int],
        tables: list[list[int]],
        logit_rows: list[int],
        interrupt: Callable[[], bool] | None = None,
        window_tables: list[list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float32 [rows, hidden] embeddings; one position and block table per row; rows of one sequence
        in position order. More than MAX_ROWS rows run as steps of PREFILL_ROWS, `interrupt` polled between
        them (ForwardInterrupted when it returns True).

        Returns float32 logits [len(logit_rows), vocab], their leading candidates recomputed exactly (as
        `Transformer._refine_top` does), and the final-normed hidden rows they came from.
        """
        rows = x.shape[0]
        if rows <= MAX_ROWS:
            return self._step(x, positions, tables, logit_rows, window_tables)
        outs = []
        for s in range(0, rows, PREFILL_ROWS):
            if interrupt is not None and interrupt():
                raise ForwardInterrupted
            e = min(rows, s + PREFILL_ROWS)
            mine = [r - s for r in logit_rows if s <= r < e]
            wt = window_tables[s:e] if window_tables is not None else None
            outs.append(self._step(x[s:e], positions[s:e], tables[s:e], mine, wt))
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _step(  # window_tables: list[list[int]] | None
        self, x: torch.Tensor, positions: list[int], tables: list, logit_rows: list[int], window_tables=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        x = x.float().contiguous()
        pos = np.asarray(positions, dtype=np.int32)
        max_blocks = max(len(t) for t in tables)
        tab = native_lib.table_array(tables, max_blocks)
        # the sliding-window layers' own tables (runtime.window_allocator), of the same shape
        wtab = native_lib.table_array(window_tables, max_blocks) if window_tables is not None else None
        lr = np.asarray(logit_rows, dtype=np.int32)
        logits = torch.empty(len(logit_rows), _pad_rows(self.vocab), dtype=torch.float32)
        h = torch.empty(len(logit_rows), self.cfg.hidden, dtype=torch.float32)
        rc = self.lib.rl_step(
            self.handle,
            self.threads,
            rows,
            x.data_ptr(),
            pos.ctypes.data,
            tab.ctypes.data,
            wtab.ctypes.data if wtab is not None else None,
            max_blocks,
            lr.ctypes.data,
            len(logit_rows),
            logits.data_ptr(),
            h.data_ptr(),
        )
        if rc != 0:
            raise MemoryError("native step: out of memory for its buffers")
        head = self.weights.head
        # Greedy exactness: the near-top logits again in float64 from the head's rows (model._refine_top).
        rc = self.lib.rl_refine_top(
            head.fmt,
            head.data.ctypes.data,
            head.k,
            self.vocab,
            h.data_ptr(),
            logits.data_ptr(),
            logits.shape[1],
            len(logit_rows),
            REFINE_MARGIN,
            REFINE_MAX,
            self._refine_work.data_ptr(),
        )
        if rc != 0:
            raise MemoryError("native step: out of memory refining logits")
        return logits[:, : self.vocab], h
