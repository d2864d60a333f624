"""Hypothesis strategies that write GGUF files from scratch, well-formed or not, for the fuzz tests.

`raw_gguf()` draws any byte layout the format can express and then some: wrong versions, lying counts,
unknown value and tensor types, nested arrays, duplicate keys and names, arbitrary dims and offsets.
`model_gguf()` draws a plausible llama/qwen2/qwen3 model (random shapes, tensor types and metadata, with
some fields perturbed) so that inputs get past the byte-level checks into the config and the loader.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

from ripelm.models.gguf_file import GGML_TYPES

VT_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
STRING, ARRAY = 8, 9
U32_MAX, U64_MAX = (1 << 32) - 1, (1 << 64) - 1
KEY_POOL = (
    "general.architecture", "general.alignment", "general.name", "split.count",
    "llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.context_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
    "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.rope.dimension_count",
    "llama.rope.scaling.type", "llama.expert_count", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
    "tokenizer.chat_template",
)  # fmt: skip
NAME_POOL = ("token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight", "blk.9.x")
QUANT_POOL = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "TQ1_0",
              "TQ2_0", "IQ4_NL", "Q2_K")  # fmt: skip
_TYPE_IDS = {info.name: t for t, info in GGML_TYPES.items()}
interesting_u64 = st.sampled_from(
    (0, 1, 2, 31, 32, 255, 1 << 16, U32_MAX, 1 << 32, 1 << 62, 1 << 63, U64_MAX)
)


def enc_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _scalar(vtype: int, value: Any) -> bytes:
    return struct.pack(VT_SCALARS[vtype], value)


def scalar_values(vtype: int) -> st.SearchStrategy[bytes]:
    fmt = VT_SCALARS[vtype]
    if vtype in (6, 12):
        return st.floats(width=32 if vtype == 6 else 64).map(lambda v: struct.pack(fmt, v))
    if vtype == 7:
        return st.integers(0, 255).map(lambda v: struct.pack(fmt, v))
    size = struct.calcsize(fmt)
    signed = fmt[1].islower()
    lo, hi = (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if signed else (0, (1 << (8 * size)) - 1)
    return st.integers(lo, hi).map(lambda v: struct.pack(fmt, v))


@st.composite
def value_payload(draw: st.DrawFn, depth: int = 0) -> tuple[int, bytes]:
    """(value type, encoded value) for a metadata value; arrays may nest and may lie about their length."""
    vtype = draw(st.sampled_from((*VT_SCALARS, STRING, ARRAY, ARRAY, 13, 99, U32_MAX)))
    if vtype in VT_SCALARS:
        return vtype, draw(scalar_values(vtype))
    if vtype == STRING:
        text = draw(st.binary(max_size=40))
        n = draw(st.one_of(st.just(len(text)), interesting_u64))
        return vtype, struct.pack("<Q", n) + text
    if vtype == ARRAY and depth < 6:
        items = draw(st.lists(value_payload(depth + 1), max_size=4))
        etype = items[0][0] if items else draw(st.sampled_from((4, STRING, ARRAY)))
        if draw(st.booleans()):  # a mixed array: every element encoded as the first one's type or not
            items = [(t, b) for t, b in items if t == etype]
        body = b"".join(b for _, b in items)
        n = draw(st.one_of(st.just(len(items)), interesting_u64))
        return vtype, struct.pack("<IQ", etype, n) + body
    return vtype, draw(st.binary(max_size=16))  # an unknown type, or nesting past the limit


@st.composite
def raw_gguf(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from((3,) * 8 + (2, 2, 1, 4, 3 << 24, U32_MAX)))
    kvs = []
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.one_of(st.sampled_from(KEY_POOL).map(str.encode), st.binary(max_size=24)))
        vtype, payload = draw(value_payload())
        if key == b"general.alignment" and draw(st.booleans()):
            vtype, payload = 4, _scalar(4, draw(st.sampled_from((0, 1, 3, 16, 32, 48, 64, 1 << 21, U32_MAX))))
        kvs.append(enc_str(key) + struct.pack("<I", vtype) + payload)
    if kvs and draw(st.booleans()):
        kvs.append(draw(st.sampled_from(kvs)))  # duplicate key
    tensors = []
    cursor = 0
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.one_of(st.sampled_from(NAME_POOL).map(str.encode), st.binary(max_size=20)))
        dims = draw(st.lists(st.one_of(st.integers(0, 300), interesting_u64), min_size=0, max_size=6))
        ttype = draw(st.one_of(st.sampled_from(sorted(GGML_TYPES)), st.integers(0, U32_MAX)))
        offset = draw(st.one_of(st.just(cursor), st.integers(0, 4096), interesting_u64))
        cursor += 256
        tensors.append(enc_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset))
    if tensors and draw(st.booleans()):
        tensors.append(draw(st.sampled_from(tensors)))  # duplicate tensor name
    n_tensors = draw(st.one_of(st.just(len(tensors)), interesting_u64))
    n_kv = draw(st.one_of(st.just(len(kvs)), interesting_u64))
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    head += bytes(-len(head) % 32)
    data = draw(st.binary(max_size=64)) * draw(st.integers(0, 40))
    cut = draw(st.one_of(st.none(), st.integers(0, len(head) + len(data))))
    out = head + data
    return out if cut is None else out[:cut]


def _kv(key: str, vtype: int, value: Any) -> bytes:
    if vtype == STRING:
        return enc_str(key.encode()) + struct.pack("<I", STRING) + enc_str(value.encode())
    if vtype == ARRAY:
        etype, items = value
        body = b"".join(enc_str(x.encode()) if etype == STRING else _scalar(etype, x) for x in items)
        return enc_str(key.encode()) + struct.pack("<IIQ", ARRAY, etype, len(items)) + body
    return enc_str(key.encode()) + struct.pack("<I", vtype) + _scalar(vtype, value)


@st.composite
def model_gguf(draw: st.DrawFn) -> bytes:
    """A small llama/qwen2/qwen3 file whose metadata and tensors mostly agree, with random perturbations."""
    arch = draw(st.sampled_from(("llama", "llama", "qwen2", "qwen3", "mistral", "gpt2")))
    n_layers = draw(st.integers(1, 2))
    qtype = draw(st.sampled_from(QUANT_POOL))
    block = GGML_TYPES[_TYPE_IDS[qtype]].block_size
    # Mostly shapes the type can hold (so inputs reach the config and the loader), sometimes not.
    fits = draw(st.integers(0, 4)) > 0
    hidden = draw(st.sampled_from((256,) if fits and block > 64 else (32, 64, 256)))
    n_heads = draw(st.sampled_from((1, 2, 4)))
    n_kv = draw(st.sampled_from((1, 2, 4) if not fits else (1, n_heads)))
    head_dim = hidden // n_heads if fits else draw(st.sampled_from((hidden // n_heads, 8, 16, 3)))
    ffn = draw(st.sampled_from((256,) if fits and block > 64 else (32, 64, 256)))
    vocab = draw(st.integers(3, 40))
    tied = draw(st.booleans())
    meta: dict[str, tuple[int, Any]] = {
        f"{arch}.block_count": (4, n_layers),
        f"{arch}.context_length": (4, draw(st.sampled_from((1, 64, 4096, U32_MAX)))),
        f"{arch}.embedding_length": (4, hidden),
        f"{arch}.feed_forward_length": (4, ffn),
        f"{arch}.attention.head_count": (4, n_heads),
        f"{arch}.attention.head_count_kv": (4, n_kv),
        f"{arch}.attention.layer_norm_rms_epsilon": (6, 1e-5),
        "tokenizer.ggml.eos_token_id": (4, 1),
    }
    if head_dim != hidden // n_heads:
        meta[f"{arch}.attention.key_length"] = (4, head_dim)
    for _ in range(draw(st.integers(0, 3))):  # perturb: a value out of range or of the wrong type
        key = draw(st.sampled_from(sorted(meta)))
        vtype = draw(st.sampled_from((4, 4, 5, 6, 10, 7)))
        if vtype == 4:
            raw = _scalar(4, draw(st.sampled_from((0, 1, 3, 7, U32_MAX))))
        else:
            raw = draw(scalar_values(vtype))
        meta[key] = (vtype, struct.unpack(VT_SCALARS[vtype], raw)[0])
    kvs = [_kv("general.architecture", STRING, arch)]
    kvs += [_kv(k, t, v) for k, (t, v) in meta.items()]
    kvs.append(_kv("tokenizer.ggml.tokens", ARRAY, (STRING, [f"t{i}" for i in range(vocab)])))

    q, kvd = n_heads * head_dim, n_kv * head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hidden, vocab)}
    shapes["output_norm.weight"] = (hidden,)
    if not tied:
        shapes["output.weight"] = (hidden, vocab)
    for i in range(n_layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,)}
        shapes |= {b + "attn_q.weight": (hidden, q), b + "attn_k.weight": (hidden, kvd)}
        shapes |= {b + "attn_v.weight": (hidden, kvd), b + "attn_output.weight": (q, hidden)}
        shapes |= {b + "ffn_gate.weight": (hidden, ffn), b + "ffn_up.weight": (hidden, ffn)}
        shapes[b + "ffn_down.weight"] = (ffn, hidden)
        if arch == "qwen2":
            shapes |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kvd,), b + "attn_v.bias": (kvd,)}
        if arch == "qwen3":
            shapes |= {b + "attn_q_norm.weight": (head_dim,), b + "attn_k_norm.weight": (head_dim,)}
    if draw(st.booleans()):  # perturb one tensor: drop it, reshape it or retype it
        name = draw(st.sampled_from(sorted(shapes)))
        how = draw(st.sampled_from(("drop", "shape", "rank")))
        if how == "drop":
            del shapes[name]
        elif how == "shape":
            shapes[name] = tuple(d * 2 for d in shapes[name])
        else:
            shapes[name] = (*shapes[name], 1)
    infos, blobs, cursor = [], [], 0
    for name, shape in shapes.items():
        tname = qtype if len(shape) == 2 else "F32"
        tid = _TYPE_IDS[tname]
        info = GGML_TYPES[tid]
        n = 1
        for d in shape:
            n *= d
        nbytes = max(n // info.block_size, 1) * info.type_size
        dims = struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, tid, cursor)
        infos.append(enc_str(name.encode()) + dims)
        blob = draw(st.sampled_from((b"\x00", b"\x3c", b"\xff", b"\x7f\x80"))) * nbytes
        blobs.append(blob[:nbytes] + bytes(-nbytes % 32))
        cursor += len(blobs[-1])
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + b"".join(blobs)
