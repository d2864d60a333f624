"""Tests for the strict GGUF reader (models/gguf_file.py, gguf_reader.py) and models/config.py."""

from __future__ import annotations

import os
import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from ripelm.models.config import ModelConfig, config_from_gguf
from ripelm.models.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from ripelm.models.gguf_file import (
    GGML_TYPES,
    GGUFFile,
    GGUFValueType,
    open_gguf,
    unsupported_tensor_types,
)
from ripelm.models.store import bundled_model_path

VT = GGUFValueType
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8


def _bundled_model() -> Path | None:
    return bundled_model_path()


MODEL = _bundled_model()
needs_model = pytest.mark.skipif(MODEL is None, reason="bundled SmolLM2 GGUF not installed")


# -- a tiny GGUF writer --------------------------------------------------------------------------------------

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


def enc_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_val(vtype: int, value: Any) -> bytes:
    if vtype == VT.STRING:
        return enc_str(value)
    if vtype == VT.ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(enc_val(etype, x) for x in items)
    return struct.pack(_FMT[vtype], value)


def kv(key: str | bytes, vtype: int, value: Any) -> bytes:
    return enc_str(key) + struct.pack("<I", vtype) + enc_val(vtype, value)


@dataclass
class T:
    name: str | bytes
    shape: tuple[int, ...]
    ggml_type: int = F32
    offset: int | None = None  # relative to the data section; None = next aligned free spot
    nbytes: int | None = None  # data to reserve; None = computed from shape and type


def _nbytes(t: T) -> int:
    if t.nbytes is not None:
        return t.nbytes
    info = GGML_TYPES[t.ggml_type]
    n = 1
    for d in t.shape:
        n *= d
    return n // info.block_size * info.type_size


def build_gguf(
    kvs: list[bytes],
    tensors: list[T],
    *,
    version: int = 3,
    alignment: int = 32,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    data_size: int | None = None,
) -> bytes:
    offsets, cur = [], 0
    for t in tensors:
        off = cur if t.offset is None else t.offset
        offsets.append(off)
        cur = max(cur, -(-(off + _nbytes(t)) // alignment) * alignment)
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    n_kv = len(kvs) if n_kv is None else n_kv
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv))
    for item in kvs:
        out += item
    for t, off in zip(tensors, offsets, strict=True):
        out += enc_str(t.name) + struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *t.shape, t.ggml_type, off)
    out += bytes(-len(out) % alignment)
    cur = cur if data_size is None else data_size
    out += (bytes(range(256)) * (cur // 256 + 1))[:cur]
    return bytes(out)


def small_kvs(arch: str = "llama") -> list[bytes]:
    return [
        kv("general.architecture", VT.STRING, arch),
        kv("general.name", VT.STRING, "tiny"),
        kv("some.u32", VT.UINT32, 7),
        kv("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["a", "b", "c"])),
    ]


def small_tensors() -> list[T]:
    return [T("a.weight", (32, 2), Q8_0), T("b.weight", (8,), F32), T("c.weight", (4, 3, 2), F16)]


def small_gguf() -> bytes:
    return build_gguf(small_kvs(), small_tensors())


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def format_error(tmp_path: Path, data: bytes) -> str:
    p = write(tmp_path, data)
    with pytest.raises(ModelFormatError) as ei:
        open_gguf(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: "), msg  # every message names the file
    return msg


# -- the bundled model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> GGUFFile:
    assert MODEL is not None
    return open_gguf(MODEL)


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    assert MODEL is not None
    return gguf.GGUFReader(MODEL)


@pytest.fixture(scope="module")
def model_head(model: GGUFFile) -> bytes:
    # The header region plus a little data: enough to corrupt without copying the whole 98 MB file.
    assert MODEL is not None
    with open(MODEL, "rb") as f:
        return f.read(model.data_offset + (1 << 20))


@needs_model
def test_bundled_model_matches_gguf_reader(model: GGUFFile, reader: gguf.GGUFReader) -> None:
    assert model.version == 3
    assert model.alignment == reader.alignment == 32
    assert model.data_offset == reader.data_offset
    assert model.file_size == MODEL.stat().st_size
    assert list(model.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        t = model.tensors[rt.name]
        assert t.shape == tuple(int(d) for d in rt.shape)
        assert t.torch_shape == tuple(reversed(t.shape))
        assert t.ggml_type == int(rt.tensor_type)
        assert t.type_name == rt.tensor_type.name
        assert t.offset == rt.data_offset
        assert t.nbytes == rt.n_bytes
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(model.metadata) == list(fields)
    for key, f in fields.items():
        ours, theirs = model.metadata[key], f.contents()
        if isinstance(ours, np.ndarray):
            np.testing.assert_array_equal(ours, np.asarray(theirs))
        else:
            assert ours == theirs, key
        assert model.metadata_types[key] == int(f.types[0])


@needs_model
def test_bundled_model_metadata_and_tensor_bytes(model: GGUFFile, reader: gguf.GGUFReader) -> None:
    md = model.metadata
    assert md["general.architecture"] == "llama" == model.architecture
    assert md["llama.block_count"] == 30
    assert md["llama.rope.freq_base"] == pytest.approx(100000.0)
    tokens = md["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 49152 and tokens[1] == "<|im_start|>"
    merges = md["tokenizer.ggml.merges"]
    assert len(merges) == 48900 and all(isinstance(m, str) for m in merges)
    tt = md["tokenizer.ggml.token_type"]
    assert isinstance(tt, np.ndarray) and tt.dtype == np.int32 and tt.shape == (49152,)
    assert md["general.languages"] == ["en"]
    by_name = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.29.ffn_down.weight"):
        b = model.tensor_bytes(name)
        assert isinstance(b, np.memmap) and b.dtype == np.uint8 and not b.flags.writeable
        assert b.nbytes == model.tensors[name].nbytes
        assert bytes(b[:4096]) == by_name[name].data.tobytes()[:4096]
    with pytest.raises(KeyError):
        model.tensor_bytes("nope")


@needs_model
def test_bundled_model_opens_fast() -> None:
    assert MODEL is not None
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        open_gguf(MODEL)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.3, f"open_gguf took {best:.3f}s"


@needs_model
def test_bundled_model_config(model: GGUFFile) -> None:
    cfg = config_from_gguf(model)
    assert isinstance(cfg, ModelConfig)
    assert (cfg.arch, cfg.n_layers, cfg.hidden, cfg.ffn) == ("llama", 30, 576, 1536)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim) == (9, 3, 64, 64)
    assert cfg.vocab_size == 49152 and cfg.context_length == 8192
    assert cfg.tied_embeddings and not cfg.attn_bias and not cfg.qk_norm and not cfg.has_rope_freqs
    assert cfg.rope_theta == pytest.approx(100000.0)
    assert cfg.rms_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.chat_template is not None and "<|im_start|>" in cfg.chat_template
    assert cfg.rope_scaling_type is None and cfg.rope_scaling_factor is None


@needs_model
def test_unsupported_tensor_types(model: GGUFFile) -> None:
    assert unsupported_tensor_types(model, {F32, Q4_1, Q8_0}) == []
    missing = unsupported_tensor_types(model, {F32, Q8_0})
    assert len(missing) == 210 and all(type_name == "Q4_1" for _, type_name in missing)
    assert ("blk.0.attn_q.weight", "Q4_1") in missing


# -- corrupting a copy of the bundled model's header region --------------------------------------------------


def _after_string(head: bytes, text: str) -> int:
    """Offset just past the first encoded GGUF string `text` (a metadata key or tensor name)."""
    needle = enc_str(text)
    pos = head.find(needle)
    assert pos > 0
    return pos + len(needle)


def _cut_points(head: bytes, model: GGUFFile) -> list[tuple[int, str]]:
    table = head.find(enc_str("token_embd.weight"))
    assert table > 0
    tokens = head.find(enc_str("tokenizer.ggml.tokens"))
    meta = [24 + (tokens - 24) * i // 4 for i in range(1, 4)]
    in_tokens = [tokens + 100, tokens + 200_000, tokens + 400_000]
    merges = head.find(enc_str("tokenizer.ggml.merges"))
    in_merges = [merges + 30, merges + 300_000]
    in_table = [table + 5, table + (model.data_offset - table) // 2, model.data_offset - 40]
    in_data = [model.data_offset, model.data_offset + 1000, model.data_offset + 500_000]
    cuts = [(0, "is empty"), (1, "only 1 bytes"), (3, "only 3 bytes"), (5, "truncated"), (12, "truncated")]
    cuts += [(c, "truncated") for c in [23, *meta, *in_tokens, *in_merges, *in_table, model.data_offset - 1]]
    cuts += [(c, "lies outside the file") for c in in_data]
    return cuts


@needs_model
def test_truncation_at_many_points(tmp_path: Path, model: GGUFFile, model_head: bytes) -> None:
    cuts = _cut_points(model_head, model)
    assert len(cuts) >= 20
    for cut, expected in cuts:
        msg = format_error(tmp_path, model_head[:cut])
        assert expected in msg, (cut, msg)


@needs_model
def test_header_only_copy_reports_first_tensor_outside(tmp_path: Path, model_head: bytes) -> None:
    msg = format_error(tmp_path, model_head)
    assert "tensor 'token_embd.weight' data [" in msg and "lies outside the file" in msg


@needs_model
def test_sparse_full_size_copy_of_header(tmp_path: Path, model: GGUFFile, model_head: bytes) -> None:
    # Same size as the real file but only the header written (sparse): the layout checks all pass.
    p = tmp_path / "sparse.gguf"
    with open(p, "wb") as f:
        f.write(model_head[: model.data_offset])
        f.truncate(model.file_size)
    g = open_gguf(p)
    assert g.tensors == model.tensors and g.data_offset == model.data_offset
    assert config_from_gguf(g) == config_from_gguf(model)


def _patched(head: bytes, at: int, new: bytes) -> bytes:
    return head[:at] + new + head[at + len(new) :]


@needs_model
@pytest.mark.parametrize(
    ("at", "new", "expected"),
    [
        (4, struct.pack("<I", 4), "unsupported GGUF version 4"),
        (4, struct.pack("<I", 1), "version 1 is not supported"),
        (4, struct.pack(">I", 3), "big-endian"),
        (8, struct.pack("<Q", 2**60), "absurd tensor count 1152921504606846976"),
        (16, struct.pack("<Q", 2**60), "absurd metadata count 1152921504606846976"),
        (0, b"GGUG", "bad magic b'GGUG'"),
    ],
)
def test_patched_header_fields(tmp_path: Path, model_head: bytes, at: int, new: bytes, expected: str) -> None:
    assert expected in format_error(tmp_path, _patched(model_head, at, new))


@needs_model
def test_patched_model_duplicates_and_alignment(tmp_path: Path, model_head: bytes) -> None:
    # Same-length renames keep the layout intact, so only the duplicate is wrong.
    at = model_head.find(enc_str("general.name"))
    msg = format_error(tmp_path, _patched(model_head, at, enc_str("general.type")))
    assert "duplicate metadata key 'general.type'" in msg

    at = model_head.find(enc_str("blk.0.attn_k.weight"))
    msg = format_error(tmp_path, _patched(model_head, at, enc_str("blk.0.attn_q.weight")))
    assert "duplicate tensor name 'blk.0.attn_q.weight'" in msg

    # token_embd.weight: n_dims u32, two u64 dims, type u32, then its offset.
    off_at = _after_string(model_head, "token_embd.weight") + 4 + 16 + 4
    assert struct.unpack_from("<Q", model_head, off_at)[0] == 0
    msg = format_error(tmp_path, _patched(model_head, off_at, struct.pack("<Q", 16)))
    assert "tensor 'token_embd.weight' offset 16 is not a multiple of the alignment 32" in msg

    type_at = off_at - 4
    msg = format_error(tmp_path, _patched(model_head, type_at, struct.pack("<I", 77)))
    assert "tensor 'token_embd.weight' has unknown ggml type 77" in msg

    # Absurd string length in the token list: first token's length field.
    tok = _after_string(model_head, "tokenizer.ggml.tokens") + 4 + 4 + 8  # value type, elem type, count
    msg = format_error(tmp_path, _patched(model_head, tok, struct.pack("<Q", 2**62)))
    assert "absurd string length 4611686018427387904" in msg and "tokenizer.ggml.tokens" in msg


# -- small hand-written files --------------------------------------------------------------------------------


def test_small_valid_file_roundtrip(tmp_path: Path) -> None:
    data = small_gguf()
    g = open_gguf(write(tmp_path, data))
    assert g.version == 3 and g.alignment == 32
    assert g.metadata == {
        "general.architecture": "llama",
        "general.name": "tiny",
        "some.u32": 7,
        "tokenizer.ggml.tokens": ["a", "b", "c"],
    }
    a, b, c = (g.tensors[n] for n in ("a.weight", "b.weight", "c.weight"))
    assert a.shape == (32, 2) and a.torch_shape == (2, 32) and a.nbytes == 68 and a.offset == g.data_offset
    assert b.offset == g.data_offset + 96 and b.nbytes == 32 and b.type_name == "F32"
    assert c.shape == (4, 3, 2) and c.torch_shape == (2, 3, 4) and c.n_elements == 24 and c.nbytes == 48
    assert bytes(g.tensor_bytes("b.weight")) == data[b.offset : b.offset + 32]
    assert g.data_offset % 32 == 0
    v2 = open_gguf(write(tmp_path, build_gguf(small_kvs(), small_tensors(), version=2), "v2.gguf"))
    assert v2.version == 2 and v2.tensors == g.tensors


def test_every_value_type(tmp_path: Path) -> None:
    kvs = [
        kv("u8", VT.UINT8, 250),
        kv("i8", VT.INT8, -5),
        kv("u16", VT.UINT16, 65000),
        kv("i16", VT.INT16, -30000),
        kv("u32", VT.UINT32, 4_000_000_000),
        kv("i32", VT.INT32, -2_000_000_000),
        kv("f32", VT.FLOAT32, 0.5),
        kv("bool", VT.BOOL, 1),
        kv("str", VT.STRING, "héllo"),
        kv("bad_utf8", VT.STRING, b"ok\xff"),
        kv("u64", VT.UINT64, 2**63 + 1),
        kv("i64", VT.INT64, -(2**62)),
        kv("f64", VT.FLOAT64, 1e300),
        kv("small_arr", VT.ARRAY, (VT.INT32, [1, -2, 3])),
        kv("big_arr", VT.ARRAY, (VT.FLOAT32, [0.25] * 1000)),
        kv("bool_arr", VT.ARRAY, (VT.BOOL, [1, 0])),
        kv("nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, [1, 2]), (VT.STRING, ["x"])])),
        kv("empty_arr", VT.ARRAY, (VT.STRING, [])),
    ]
    g = open_gguf(write(tmp_path, build_gguf(kvs, [])))
    md = g.metadata
    assert (md["u8"], md["i8"], md["u16"], md["i16"]) == (250, -5, 65000, -30000)
    assert (md["u32"], md["i32"]) == (4_000_000_000, -2_000_000_000)
    assert (md["u64"], md["i64"]) == (2**63 + 1, -(2**62))
    assert md["f32"] == 0.5 and md["f64"] == 1e300 and md["bool"] is True
    assert md["str"] == "héllo" and md["bad_utf8"] == "ok\ufffd"
    assert md["small_arr"] == [1, -2, 3] and md["bool_arr"] == [True, False]
    big = md["big_arr"]
    assert isinstance(big, np.ndarray) and big.dtype == np.float32 and big.shape == (1000,)
    assert not big.flags.writeable
    assert md["nested"] == [[1, 2], ["x"]] and md["empty_arr"] == []
    assert g.metadata_types["nested"] == VT.ARRAY and g.metadata_types["f32"] == VT.FLOAT32
    assert g.tensors == {}


def test_custom_alignment(tmp_path: Path) -> None:
    kvs = [*small_kvs(), kv("general.alignment", VT.UINT32, 64)]
    g = open_gguf(write(tmp_path, build_gguf(kvs, small_tensors(), alignment=64)))
    assert g.alignment == 64 and g.data_offset % 64 == 0
    assert all((t.offset - g.data_offset) % 64 == 0 for t in g.tensors.values())


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "is empty"),
        (b"GG", "only 2 bytes"),
        (b"hello world, this is a plain text file\n" * 3, "bad magic b'hell'"),
        (b"PK\x03\x04" + bytes(100), "bad magic b'PK\\x03\\x04'"),
        (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer"),
        (b"GGUF\x03\x00\x00\x00" + bytes(10), "too short for a header"),
    ],
)
def test_not_gguf(tmp_path: Path, data: bytes, expected: str) -> None:
    assert expected in format_error(tmp_path, data)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        open_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ModelFormatError, match="is a directory"):
        open_gguf(tmp_path)
    p = write(tmp_path, small_gguf())
    if os.name == "posix" and os.geteuid() != 0:
        p.chmod(0)
        with pytest.raises(ModelFormatError, match="cannot read"):
            open_gguf(p)


def test_absurd_counts(tmp_path: Path) -> None:
    msg = format_error(tmp_path, build_gguf(small_kvs(), small_tensors(), n_tensors=2**60))
    assert "absurd tensor count 1152921504606846976" in msg
    msg = format_error(tmp_path, build_gguf(small_kvs(), small_tensors(), n_kv=2**60))
    assert "absurd metadata count 1152921504606846976" in msg
    # Plausible-looking but still more than the rest of the file can hold.
    msg = format_error(tmp_path, build_gguf(small_kvs(), small_tensors(), n_tensors=40))
    assert "truncated GGUF: 4 key/value pairs and 40 tensor infos cannot fit" in msg
    format_error(tmp_path, build_gguf(small_kvs(), small_tensors(), n_kv=5))


def test_absurd_string_and_array_lengths(tmp_path: Path) -> None:
    raw_key = struct.pack("<Q", 2**62) + b"k"
    msg = format_error(tmp_path, build_gguf([raw_key], []))
    assert "absurd string length 4611686018427387904 for metadata key #0" in msg

    raw_val = enc_str("s") + struct.pack("<IQ", VT.STRING, 2**40) + b"xx"
    msg = format_error(tmp_path, build_gguf([raw_val], []))
    assert "absurd string length 1099511627776 for 's'" in msg

    for etype in (VT.UINT8, VT.STRING, VT.ARRAY, VT.FLOAT64):
        raw_arr = enc_str("arr") + struct.pack("<IIQ", VT.ARRAY, etype, 2**61)
        msg = format_error(tmp_path, build_gguf([raw_arr, *small_kvs()], small_tensors()))
        assert "absurd array length 2305843009213693952 for 'arr'" in msg

    raw_arr = enc_str("arr") + struct.pack("<IIQ", VT.ARRAY, VT.UINT32, 1000) + bytes(40)
    msg = format_error(tmp_path, build_gguf([raw_arr], []))
    assert "truncated GGUF: array length 1000 for 'arr'" in msg


def test_size_caps_bound_memory(tmp_path: Path) -> None:
    # Sparse files make the lengths below fit in the file, so only the caps can stop them.
    p = tmp_path / "big.gguf"
    with open(p, "wb") as f:
        f.write(build_gguf([enc_str("s") + struct.pack("<IQ", VT.STRING, (64 << 20) + 1)], []))
        f.truncate(80 << 20)
    with pytest.raises(
        ModelFormatError, match=r"'s' at offset \d+ is 67108865 bytes long \(limit 67108864\)"
    ):
        open_gguf(p)
    with open(p, "wb") as f:
        f.write(build_gguf([enc_str("a") + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, 300 << 20)], []))
        f.truncate(400 << 20)
    with pytest.raises(ModelFormatError, match="beyond the first 256 MiB"):
        open_gguf(p)


def test_unknown_value_types(tmp_path: Path) -> None:
    raw = enc_str("weird") + struct.pack("<I", 13) + bytes(8)
    assert "unknown metadata value type 13 for 'weird'" in format_error(tmp_path, build_gguf([raw], []))
    raw = enc_str("weird_arr") + struct.pack("<IIQ", VT.ARRAY, 99, 1) + bytes(8)
    msg = format_error(tmp_path, build_gguf([raw], []))
    assert "unknown metadata array element type 99 for 'weird_arr'" in msg
    raw = enc_str("flag") + struct.pack("<IB", VT.BOOL, 2)
    assert "invalid bool value 2 for 'flag'" in format_error(tmp_path, build_gguf([raw], []))


def test_nested_arrays_depth_bounded(tmp_path: Path) -> None:
    value: Any = (VT.UINT8, [1])
    for _ in range(4):
        value = (VT.ARRAY, [value])
    ok = kv("deep", VT.ARRAY, value[1][0])  # four levels
    assert open_gguf(write(tmp_path, build_gguf([ok], []))).metadata["deep"] == [[[[1]]]]
    msg = format_error(tmp_path, build_gguf([kv("deep", VT.ARRAY, value)], []))
    assert "nested deeper than 4" in msg


def test_keys_and_names(tmp_path: Path) -> None:
    msg = format_error(tmp_path, build_gguf([kv(b"bad\xffkey", VT.UINT8, 1)], []))
    assert "metadata key #0 at offset 24 is not valid UTF-8" in msg
    assert "empty metadata key #0" in format_error(tmp_path, build_gguf([kv("", VT.UINT8, 1)], []))
    kvs = [*small_kvs(), kv("some.u32", VT.UINT32, 8)]
    assert "duplicate metadata key 'some.u32'" in format_error(tmp_path, build_gguf(kvs, small_tensors()))
    tensors = [*small_tensors(), T("b.weight", (8,), F32)]
    assert "duplicate tensor name 'b.weight'" in format_error(tmp_path, build_gguf(small_kvs(), tensors))
    msg = format_error(tmp_path, build_gguf([], [T(b"x\xc3", (8,))]))
    assert "tensor name #0" in msg and "UTF-8" in msg


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (T("t0", ()), "tensor 't0' has n_dims 0 (must be 1..4)"),
        (T("t5", (1, 1, 1, 1, 1)), "tensor 't5' has n_dims 5 (must be 1..4)"),
        (T("zero", (8, 0), nbytes=0), "tensor 'zero' has a zero dimension"),
        (T("huge", (2**40, 2**40), nbytes=4), "tensor 'huge' has an absurd shape"),
        (T("odd", (16, 2), Q4_0), "tensor 'odd' row length 16 is not a multiple of the Q4_0 block size 32"),
        (T("unk", (8,), 99, nbytes=32), "tensor 'unk' has unknown ggml type 99"),
        (T("mis", (8,), offset=8), "tensor 'mis' offset 8 is not a multiple of the alignment 32"),
    ],
)
def test_bad_tensor_info(tmp_path: Path, tensor: T, expected: str) -> None:
    assert expected in format_error(tmp_path, build_gguf(small_kvs(), [*small_tensors(), tensor]))


def test_tensor_data_outside_file_and_overlap(tmp_path: Path) -> None:
    data = build_gguf(small_kvs(), small_tensors())
    g = open_gguf(write(tmp_path, data))
    c = g.tensors["c.weight"]
    msg = format_error(tmp_path, data[: c.offset + c.nbytes - 1])
    assert f"tensor 'c.weight' data [{c.offset}, {c.offset + c.nbytes}) lies outside the file" in msg

    far = [*small_tensors(), T("far", (8,), offset=1 << 40)]
    msg = format_error(tmp_path, build_gguf(small_kvs(), far, data_size=1024))
    assert "tensor 'far' data [" in msg and "lies outside the file" in msg

    overlap = [T("a", (64,)), T("b", (8,), offset=128)]  # a covers [0, 256)
    msg = format_error(tmp_path, build_gguf(small_kvs(), overlap))
    assert "tensors 'a' [" in msg and "and 'b' [" in msg and "overlap" in msg

    same = [T("a", (8,), offset=0), T("b", (8,), offset=0)]
    assert "overlap" in format_error(tmp_path, build_gguf(small_kvs(), same))


@pytest.mark.parametrize(
    ("value", "vtype", "expected"),
    [
        (0, VT.UINT32, "general.alignment 0 is invalid"),
        (48, VT.UINT32, "general.alignment 48 is invalid"),
        (1 << 30, VT.UINT32, "is invalid"),
        (32, VT.UINT64, "general.alignment must be a uint32"),
    ],
)
def test_bad_alignment(tmp_path: Path, value: int, vtype: int, expected: str) -> None:
    kvs = [*small_kvs(), kv("general.alignment", vtype, value)]
    assert expected in format_error(tmp_path, build_gguf(kvs, small_tensors()))


def test_small_file_truncated_everywhere(tmp_path: Path) -> None:
    data = small_gguf()
    g = open_gguf(write(tmp_path, data))
    end = max(t.offset + t.nbytes for t in g.tensors.values())
    assert end < len(data)  # the padding after the last tensor is not needed...
    open_gguf(write(tmp_path, data[:end]))
    for cut in range(end):  # ...but every byte before its end is
        msg = format_error(tmp_path, data[:cut])
        assert any(s in msg for s in ("truncated", "lies outside", "empty", "only")), (cut, msg)


def test_random_corruption_only_raises_model_format_error(tmp_path: Path) -> None:
    rng = random.Random(1234)
    base = small_gguf()
    header_end = open_gguf(write(tmp_path, base)).data_offset
    p = tmp_path / "fuzz.gguf"
    failures = 0
    for i in range(400):
        data = bytearray(base)
        kind = i % 4
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(header_end)] = rng.randrange(256)
        elif kind == 2:
            at = rng.randrange(header_end - 8)
            data[at : at + 8] = struct.pack("<Q", rng.choice([2**63, 2**32 + 1, 10**6, rng.getrandbits(64)]))
        else:
            data[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
            data = data[: rng.randrange(8, len(data) + 1)]
        p.write_bytes(bytes(data))
        t0 = time.perf_counter()
        try:
            open_gguf(p)
        except ModelFormatError:
            failures += 1
        assert time.perf_counter() - t0 < 0.5, i
    assert failures > 200  # most corruptions must be caught, not silently accepted


# -- configs -------------------------------------------------------------------------------------------------


def _model_kvs(arch: str, *, extra: list[bytes] | None = None, n_layers: int = 2) -> list[bytes]:
    return [
        kv("general.architecture", VT.STRING, arch),
        kv(f"{arch}.block_count", VT.UINT32, n_layers),
        kv(f"{arch}.context_length", VT.UINT32, 256),
        kv(f"{arch}.embedding_length", VT.UINT32, 64),
        kv(f"{arch}.feed_forward_length", VT.UINT32, 96),
        kv(f"{arch}.attention.head_count", VT.UINT32, 4),
        kv(f"{arch}.attention.head_count_kv", VT.UINT32, 2),
        kv(f"{arch}.attention.layer_norm_rms_epsilon", VT.FLOAT32, 1e-6),
        kv("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, [f"t{i}" for i in range(40)])),
        kv("tokenizer.ggml.bos_token_id", VT.UINT32, 1),
        kv("tokenizer.ggml.eos_token_id", VT.UINT32, 2),
        kv("tokenizer.chat_template", VT.STRING, "{{ messages }}"),
        *(extra or []),
    ]


def _model_tensors(
    *, head_dim: int = 16, bias: bool = False, qk_norm: bool = False, tied: bool = True, n_layers: int = 2
) -> list[T]:
    h, ffn, vocab, q, k = 64, 96, 40, 4 * head_dim, 2 * head_dim
    ts = [T("token_embd.weight", (h, vocab), F16), T("output_norm.weight", (h,))]
    if not tied:
        ts.append(T("output.weight", (h, vocab), F16))
    for i in range(n_layers):
        b = f"blk.{i}."
        ts += [
            T(b + "attn_norm.weight", (h,)),
            T(b + "attn_q.weight", (h, q), Q8_0),
            T(b + "attn_k.weight", (h, k), Q8_0),
            T(b + "attn_v.weight", (h, k), Q8_0),
            T(b + "attn_output.weight", (q, h), Q8_0),
            T(b + "ffn_norm.weight", (h,)),
            T(b + "ffn_gate.weight", (h, ffn), Q8_0),
            T(b + "ffn_up.weight", (h, ffn), Q8_0),
            T(b + "ffn_down.weight", (ffn, h), F16),
        ]
        if bias:
            ts += [T(b + "attn_q.bias", (q,)), T(b + "attn_k.bias", (k,)), T(b + "attn_v.bias", (k,))]
        if qk_norm:
            ts += [T(b + "attn_q_norm.weight", (head_dim,)), T(b + "attn_k_norm.weight", (head_dim,))]
    return ts


def _config(tmp_path: Path, kvs: list[bytes], tensors: list[T]) -> ModelConfig:
    return config_from_gguf(open_gguf(write(tmp_path, build_gguf(kvs, tensors))))


def _config_error(
    tmp_path: Path, kvs: list[bytes], tensors: list[T], exc: type[Exception] = ModelFormatError
) -> str:
    with pytest.raises(exc) as ei:
        _config(tmp_path, kvs, tensors)
    return str(ei.value)


def test_tiny_llama_config(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _model_kvs("llama"), _model_tensors(tied=False))
    assert (cfg.arch, cfg.n_layers, cfg.hidden, cfg.ffn) == ("llama", 2, 64, 96)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim) == (4, 2, 16, 16)
    assert (cfg.rope_theta, cfg.vocab_size, cfg.context_length) == (10000.0, 40, 256)
    assert not cfg.tied_embeddings and not cfg.attn_bias and not cfg.qk_norm
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.chat_template) == (1, 2, "{{ messages }}")
    assert cfg.rms_eps == pytest.approx(1e-6)


def test_llama3_rope_scaling_fields(tmp_path: Path) -> None:
    extra = [
        kv("llama.rope.freq_base", VT.FLOAT32, 500000.0),
        kv("llama.rope.scaling.type", VT.STRING, "linear"),
        kv("llama.rope.scaling.factor", VT.FLOAT32, 8.0),
        kv("llama.rope.scaling.original_context_length", VT.UINT32, 128),
    ]
    tensors = [*_model_tensors(), T("rope_freqs.weight", (8,))]
    cfg = _config(tmp_path, _model_kvs("llama", extra=extra), tensors)
    assert (cfg.rope_theta, cfg.rope_scaling_type, cfg.rope_scaling_factor) == (500000.0, "linear", 8.0)
    assert cfg.rope_scaling_orig_ctx == 128 and cfg.has_rope_freqs


def test_qwen2_config_needs_biases(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _model_kvs("qwen2"), _model_tensors(bias=True))
    assert cfg.arch == "qwen2" and cfg.attn_bias and cfg.tied_embeddings
    msg = _config_error(tmp_path, _model_kvs("qwen2"), _model_tensors())
    assert "qwen2 model is missing tensor 'blk.0.attn_q.bias'" in msg


def test_qwen3_config_key_length_and_qk_norm(tmp_path: Path) -> None:
    extra = [kv(f"qwen3.attention.{k}_length", VT.UINT32, 32) for k in ("key", "value")]
    cfg = _config(tmp_path, _model_kvs("qwen3", extra=extra), _model_tensors(head_dim=32, qk_norm=True))
    assert cfg.qk_norm and cfg.head_dim == 32 and cfg.rope_dim == 32 and cfg.q_dim == 128
    msg = _config_error(tmp_path, _model_kvs("qwen3", extra=extra), _model_tensors(head_dim=32))
    assert "missing tensor 'blk.0.attn_q_norm.weight'" in msg


def test_config_tensor_shape_and_presence_errors(tmp_path: Path) -> None:
    tensors = [t for t in _model_tensors() if t.name != "blk.1.ffn_up.weight"]
    assert "missing tensor 'blk.1.ffn_up.weight'" in _config_error(tmp_path, _model_kvs("llama"), tensors)
    wrong = T("blk.0.attn_k.weight", (64, 64), Q8_0)
    tensors = [wrong if t.name == wrong.name else t for t in _model_tensors()]
    msg = _config_error(tmp_path, _model_kvs("llama"), tensors)
    assert "tensor 'blk.0.attn_k.weight' has shape [64, 64], expected [64, 32]" in msg
    tensors = [*_model_tensors(), T("blk.7.attn_norm.weight", (64,))]
    assert "blk.7.attn_norm.weight" in _config_error(tmp_path, _model_kvs("llama"), tensors)


def test_config_metadata_errors(tmp_path: Path) -> None:
    kvs = [k for k in _model_kvs("llama") if b"block_count" not in k]
    assert "missing metadata key 'llama.block_count'" in _config_error(tmp_path, kvs, _model_tensors())
    kvs = _model_kvs("llama", extra=[kv("llama.expert_count", VT.UINT32, 8)])
    assert "mixture-of-experts" in _config_error(tmp_path, kvs, _model_tensors(), UnsupportedModelError)
    kvs = [k for k in _model_kvs("llama") if b"eos_token_id" not in k]
    kvs.append(kv("tokenizer.ggml.eos_token_id", VT.UINT32, 40))
    assert "outside the vocabulary" in _config_error(tmp_path, kvs, _model_tensors())


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_architecture(tmp_path: Path, arch: str) -> None:
    g = open_gguf(write(tmp_path, build_gguf(small_kvs(arch), small_tensors())))
    with pytest.raises(UnsupportedModelError) as ei:
        config_from_gguf(g)
    assert f"unsupported architecture '{arch}'" in str(ei.value)
    assert "llama" in str(ei.value) and "qwen2" in str(ei.value) and "qwen3" in str(ei.value)
