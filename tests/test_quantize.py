"""`ripe quantize`: type rules and fallbacks, exact metadata, values, and files llama.cpp and we both load."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ripelm.kernels.dequant import dequantize
from ripelm.models.gguf_file import open_gguf
from ripelm.models.quant_types import QuantType
from ripelm.models.quantize import TARGETS, QuantizeError, quantize_model, summarize_fallbacks
from ripelm.quantize_cli import TYPE_NAMES


def values(path: Path, name: str) -> torch.Tensor:
    g = open_gguf(path)
    info = g.tensors[name]
    out = dequantize(g.tensor_bytes(name), info.ggml_type, info.torch_shape)
    g.close()
    return out


@pytest.fixture(scope="module")
def f32_model(tiny_model_factory) -> Path:
    # hidden 64: rows of 64 fit 32-blocks but not the 256-blocks of TQ1_0/TQ2_0
    return tiny_model_factory(qtype="F32", seed=2, hidden=64, ffn=256, n_heads=2, n_kv_heads=1)


def test_cli_choices_are_the_quantizer_targets():
    assert set(TYPE_NAMES) == set(TARGETS)


def raw_metadata(path) -> dict[str, bytes]:
    """Each key/value entry's bytes exactly as stored (key, type and value)."""
    fields = gguf.GGUFReader(path).fields.values()
    return {f.name: b"".join(p.tobytes() for p in f.parts) for f in fields if not f.name.startswith("GGUF.")}


@pytest.mark.parametrize("target", ["q4_0", "q4_1", "q8_0", "f16", "f32"])
def test_types_metadata_and_values(f32_model, tmp_path, target):
    res = quantize_model(f32_model, tmp_path / f"{target}.gguf", target)
    src, out = open_gguf(f32_model), open_gguf(res.path)
    try:
        t = TARGETS[target]
        # metadata: every entry byte for byte, except the file type written for the new precision
        a, b = raw_metadata(f32_model), raw_metadata(res.path)
        assert set(b) - set(a) <= {"general.quantization_version"}
        changed = {k for k in a if a[k] != b[k]}
        assert changed <= {"general.file_type", "general.quantization_version"}
        assert out.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
        assert list(out.tensors) == list(src.tensors)
        for name, info in out.tensors.items():
            want = QuantType.F32 if len(info.shape) == 1 else t
            if name == "token_embd.weight" and t not in (QuantType.F16, QuantType.F32):
                want = QuantType.Q8_0  # tied output head
            assert info.ggml_type == want, name
    finally:
        src.close()
        out.close()
    assert not res.fallbacks
    tol = {"q4_0": 0.25, "q4_1": 0.2, "q8_0": 0.02, "f16": 1e-3, "f32": 0.0}[target]
    for name in ("blk.0.ffn_up.weight", "token_embd.weight", "blk.1.attn_norm.weight"):
        x, y = values(f32_model, name), values(res.path, name)
        err = float((x - y).abs().max() / x.abs().max())
        assert err <= tol, (name, err)


def test_ternary_fallback_is_reported(f32_model, tmp_path):
    res = quantize_model(f32_model, tmp_path / "tq2.gguf", "tq2_0")
    g = open_gguf(res.path)
    types = {n: QuantType(i.ggml_type) for n, i in g.tensors.items()}
    g.close()
    assert types["blk.0.attn_q.weight"] == QuantType.Q4_0  # rows of 64 cannot take 256-blocks
    assert types["blk.0.ffn_down.weight"] == QuantType.TQ2_0  # rows of 256 can
    assert types["token_embd.weight"] == QuantType.Q8_0
    fallen = {p.name for p in res.fallbacks}
    assert "blk.0.attn_q.weight" in fallen and "blk.0.ffn_down.weight" not in fallen
    lines = summarize_fallbacks(res.fallbacks)
    assert any(line.startswith("blk.*.attn_q.weight x2 -> Q4_0 (rows of 64") for line in lines), lines


def test_rows_that_fit_no_block_fall_back_to_f16(tiny_model_factory, tmp_path):
    src = tiny_model_factory(qtype="F32", seed=4, hidden=48, ffn=96, n_heads=2, n_kv_heads=1)
    res = quantize_model(src, tmp_path / "q4.gguf", "q4_0")
    by_name = {p.name: p for p in res.plans}
    assert by_name["blk.0.attn_q.weight"].dst_type == QuantType.F16  # rows of 48 are not 32-blocks
    assert by_name["blk.0.attn_q.weight"].fallback
    assert by_name["blk.0.ffn_down.weight"].dst_type == QuantType.Q4_0  # rows of 96 are


def test_bundled_model_requantized_to_its_own_type_is_byte_identical(bundled_model_path, tmp_path):
    res = quantize_model(bundled_model_path, tmp_path / "same.gguf", "q4_1")
    assert res.path.read_bytes() == bundled_model_path.read_bytes()


def test_bundled_model_to_tq2_0_falls_back_like_llama_cpp(bundled_model_path, tmp_path):
    """SmolLM2's hidden size 576 is no multiple of 256: those matrices get Q4_0, ffn_down (1536) TQ2_0."""
    res = quantize_model(bundled_model_path, tmp_path / "tq2.gguf", "tq2_0")
    kinds = {(p.name.split(".")[-2], p.dst_type.name) for p in res.plans if p.name.startswith("blk.")}
    assert ("ffn_down", "TQ2_0") in kinds and ("attn_q", "Q4_0") in kinds and ("ffn_up", "Q4_0") in kinds
    assert len(res.fallbacks) == 6 * 30


def llama_cpp_quantize(src: Path, dst: Path, target: str, head: QuantType) -> Path:
    """llama.cpp's quantizer, told to give the tied head `head` (it picks Q6_K, which we cannot write)."""
    import llama_cpp
    from gguf import LlamaFileType

    from ripelm.models.quantize import FILE_TYPES

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LlamaFileType(FILE_TYPES[TARGETS[target]]))
    params.token_embedding_type = int(head)
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.mark.parametrize("target", ["q4_0", "tq2_0", "f16"])
def test_tensors_are_byte_identical_to_llama_cpp_quantizer(f32_model, tmp_path, target):
    """Same types (fallbacks included: rows of 64 cannot take TQ2_0) and the same bytes as llama.cpp writes;
    and llama.cpp evaluates our file."""
    import llama_cpp

    from ripelm.runtime.tokenizer import quiet_llama_logs

    quiet_llama_logs()
    ours = quantize_model(f32_model, tmp_path / f"ours-{target}.gguf", target).path
    head = QuantType.F16 if target == "f16" else QuantType.Q8_0
    ref = llama_cpp_quantize(f32_model, tmp_path / f"ref-{target}.gguf", target, head)
    a, b = open_gguf(ours), open_gguf(ref)
    try:
        assert set(a.tensors) == set(b.tensors)  # llama.cpp writes them sorted by name
        for name in a.tensors:
            assert a.tensors[name].ggml_type == b.tensors[name].ggml_type, name
            assert bytes(a.tensor_bytes(name)) == bytes(b.tensor_bytes(name)), name
    finally:
        a.close()
        b.close()
    llm = llama_cpp.Llama(str(ours), n_ctx=64, n_threads=1, verbose=False)
    llm.eval([1, 500, 600, 700])
    assert np.isfinite(np.array(llm.scores[: llm.n_tokens])).all()
    llm.close()


def test_errors(f32_model, tmp_path):
    with pytest.raises(QuantizeError, match="unknown type"):
        quantize_model(f32_model, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(QuantizeError, match="overwrite the input"):
        quantize_model(f32_model, f32_model, "f16")
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize_model(f32_model, tmp_path / "no" / "x.gguf", "f16")


def ripe(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli(f32_model, tmp_path):
    out = tmp_path / "tq.gguf"
    p = ripe("quantize", str(f32_model), "--to", "tq2_0", "-o", str(out), home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert out.is_file() and "fell back" in p.stderr and "blk.*.attn_q.weight" in p.stderr
    again = ripe("quantize", str(f32_model), "--to", "tq2_0", "-o", str(out), home=tmp_path)
    assert (
        again.returncode == 1
        and again.stderr.strip() == f"ripe: error: {out} exists; pass --force to overwrite it"
    )
    missing = ripe(
        "quantize", str(tmp_path / "nope.gguf"), "--to", "f16", "-o", str(out), "--force", home=tmp_path
    )
    assert missing.returncode == 1 and missing.stderr.startswith("ripe: error: ")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(ctypes.sizeof(ctypes.c_uint32)) + b"junk")
    broken = ripe("quantize", str(bad), "--to", "f16", "-o", str(tmp_path / "o.gguf"), home=tmp_path)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert ripe("quantize", str(f32_model), "--to", "q9", "-o", str(out), home=tmp_path).returncode == 2


def test_head_type_override(f32_model, tmp_path):
    res = quantize_model(f32_model, tmp_path / "h.gguf", "q4_1", head="q4_0")
    types = {p.name: p.dst_type for p in res.plans}
    assert types["token_embd.weight"] == QuantType.Q4_0 and types["blk.0.attn_q.weight"] == QuantType.Q4_1


def test_metadata_copies_keep_bytes_and_types(tmp_path):
    """Strings that are not UTF-8 and every scalar/array element type survive a copy unchanged."""
    from ripelm.models.gguf_output import TensorOut, source_fields, write_gguf

    VT = gguf.GGUFValueType
    src = tmp_path / "src.gguf"
    w = gguf.GGUFWriter(src, "llama")
    w.add_key_value("x.bad_utf8", b"ab\xff\xfe", VT.STRING)
    w.add_key_value("x.strings", [b"\xc3\x28", "tok\u00e9n"], VT.ARRAY, VT.STRING)
    for i, vt in enumerate(VT):
        if vt in (VT.STRING, VT.ARRAY):
            continue
        value = 1.5 if vt in (VT.FLOAT32, VT.FLOAT64) else True if vt == VT.BOOL else 7
        w.add_key_value(f"x.scalar{i}", value, vt)
        w.add_key_value(f"x.array{i}", [value, value], VT.ARRAY, vt)
    w.add_tensor("t.weight", np.arange(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    t = TensorOut("t.weight", (32,), int(QuantType.F32), lambda: np.arange(32, dtype=np.float32))
    write_gguf(out, source_fields(src), [t])
    assert raw_metadata(out) == raw_metadata(src)
    assert out.read_bytes() == src.read_bytes()
