"""The tiny GGUF factory writes files that llama.cpp (llama-cpp-python) loads and runs sensibly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import gguf
import numpy as np
import pytest
from gguf_factory import BUILD_TIMES, QTYPES, quantizer_path, read_gguf_header

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea,",
    "def add(a, b):\n    return",
)
N_GENERATE = 8
# One thread: these models take ~1 ms a token, and with 2 threads ggml's OpenMP workers spin at every
# barrier, which on a small shared machine (2 vCPUs here, other test processes running) makes a decode
# step 50-200x slower whenever the second core is busy.
N_THREADS = 1
# default-shape models have logits std ~4; a broken file (zero / NaN / constant logits) is far below this
MIN_LOGIT_STD = 0.5

LLAMA_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0")
CASES = [("llama", q) for q in LLAMA_QTYPES] + [("qwen2", "Q4_0"), ("qwen3", "Q4_0")]


@contextmanager
def _load(path: Path) -> Iterator[Any]:
    """``llama_cpp.Llama`` on ``path`` with ggml's extra (weight-repacking) buffer types turned off.

    The llama-cpp-python build in the dev venv (GGML_NATIVE on an AMX-capable Xeon VM) segfaults with a
    general protection fault at ``ldtilecfg`` in ``ggml_backend_amx_mul_mat`` as soon as it evaluates any
    AMX-repacked quantized model, the bundled SmolLM2 included. ``use_extra_bufts = False`` keeps the
    weights in plain CPU buffers; ``Llama`` has no argument for it, so the default params are patched
    while the model loads.
    """
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def model_params() -> Any:
        params = default_params()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", model_params):
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=256,
            n_threads=N_THREADS,
            n_threads_batch=N_THREADS,
            logits_all=True,
            verbose=False,
        )
    try:
        yield llm
    finally:
        llm.close()


def _prompt_logits(llm: Any, prompt: str) -> tuple[list[int], np.ndarray]:
    llm.reset()
    tokens = llm.tokenize(prompt.encode())
    llm.eval(tokens)
    return tokens, np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def _greedy(llm: Any, prompt: str, n: int = N_GENERATE) -> list[int]:
    _prompt_logits(llm, prompt)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.parametrize(("arch", "qtype"), CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_llama_cpp_runs_tiny_model(tiny_model_factory: Callable[..., Path], arch: str, qtype: str) -> None:
    path = tiny_model_factory(arch=arch, qtype=qtype)
    with _load(path) as llm:
        assert llm.n_vocab() == 49152
        tokens, logits = _prompt_logits(llm, PROMPTS[0])
        assert len(tokens) > 5
        assert logits.shape == (len(tokens), 49152)
        assert np.isfinite(logits).all()
        assert logits.std(axis=1).min() > MIN_LOGIT_STD
        generated = _greedy(llm, PROMPTS[0])
    assert len(generated) == N_GENERATE
    assert all(0 <= t < 49152 for t in generated)


def test_file_layout(tiny_model_factory: Callable[..., Path], bundled_model_path: Path) -> None:
    bundled = read_gguf_header(bundled_model_path)
    configs: list[dict[str, Any]] = [
        dict(arch="llama", qtype="Q4_0"),
        dict(arch="qwen2", qtype="Q4_0"),
        dict(arch="qwen3", qtype="Q4_0"),
        dict(arch="llama", qtype="Q4_K", tied=False),
        dict(arch="qwen3", qtype="TQ2_0", tied=False),
    ]
    for cfg in configs:
        arch, qtype = cfg["arch"], cfg["qtype"]
        header = read_gguf_header(tiny_model_factory(**cfg))
        value = header.value
        assert value("general.architecture") == arch
        assert value(f"{arch}.block_count") == 2
        assert value(f"{arch}.embedding_length") == 256
        assert value(f"{arch}.feed_forward_length") == 512
        assert value(f"{arch}.attention.head_count") == 4
        assert value(f"{arch}.attention.head_count_kv") == 2
        assert value(f"{arch}.rope.dimension_count") == 64
        assert value(f"{arch}.vocab_size") == 49152
        tokenizer_keys = {k for k in bundled.kvs if k.startswith("tokenizer.")}
        assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= tokenizer_keys
        assert {k: header.kvs[k] for k in tokenizer_keys} == {k: bundled.kvs[k] for k in tokenizer_keys}

        types = {name: t for name, (t, _) in header.tensors.items()}
        shapes = {name: ne for name, (_, ne) in header.tensors.items()}
        embd_type = "Q8_0" if qtype.startswith("TQ") else qtype
        assert types["token_embd.weight"] == embd_type
        assert shapes["token_embd.weight"] == (256, 49152)  # ggml order: ne0 = hidden
        assert ("output.weight" in types) == (not cfg.get("tied", True))
        if "output.weight" in types:
            assert types["output.weight"] == embd_type
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert types[f"blk.1.{name}.weight"] == qtype
        assert shapes["blk.0.attn_k.weight"] == (256, 128)
        assert shapes["blk.0.ffn_down.weight"] == (512, 256)
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert ("blk.0.attn_q.bias" in types) == (arch == "qwen2")
        assert ("blk.0.attn_q_norm.weight" in types) == (arch == "qwen3")
        if arch == "qwen3":
            assert shapes["blk.0.attn_k_norm.weight"] == (64,)
            assert value("qwen3.attention.key_length") == 64


def test_header_reader_agrees_with_gguf_reader(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory(arch="qwen2", qtype="Q4_0")
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)  # the reference, but seconds per file with a 49k-token vocab
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields.keys() == header.kvs.keys()
    for key, field in fields.items():
        assert header.value(key) == pytest.approx(field.contents()), key
        assert header.kvs[key][1] == field.types[0], key
    assert header.tensors == {
        t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors
    }


def test_greedy_continuations_depend_on_prompt(tiny_model_factory: Callable[..., Path]) -> None:
    with _load(tiny_model_factory(arch="llama", qtype="Q8_0")) as llm:
        outs = [_greedy(llm, p) for p in PROMPTS]
    assert len({tuple(o) for o in outs}) == len(PROMPTS)
    assert max(len(set(o)) for o in outs) > 1  # not just the same token repeated


def test_weights_do_not_depend_on_qtype(tiny_model_factory: Callable[..., Path]) -> None:
    """F16 and F32 files of one seed hold the same weights: llama.cpp continues them identically."""
    outs = []
    for qtype in ("F32", "F16"):
        with _load(tiny_model_factory(qtype=qtype)) as llm:
            outs.append([_greedy(llm, p) for p in PROMPTS])
    assert outs[0] == outs[1]


def test_untied_model_runs(tiny_model_factory: Callable[..., Path]) -> None:
    with _load(tiny_model_factory(arch="qwen2", qtype="Q8_0", tied=False, seed=1)) as llm:
        _, logits = _prompt_logits(llm, PROMPTS[1])
    assert np.isfinite(logits).all()
    assert logits.std(axis=1).min() > MIN_LOGIT_STD


def test_cached_builder_shares_files(tiny_model_factory: Callable[..., Path]) -> None:
    first = tiny_model_factory(arch="llama", qtype="Q4_0")
    builds = dict(BUILD_TIMES)
    assert tiny_model_factory() == first  # defaults are part of the key
    assert tiny_model_factory(qtype="Q4_0", seed=0) == first
    assert BUILD_TIMES == builds
    assert tiny_model_factory(qtype="Q4_0", seed=1) != first


def test_quantizer_paths() -> None:
    for qtype in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "TQ1_0", "TQ2_0"):
        assert quantizer_path(qtype) == "gguf"
    # gguf 0.19 cannot quantize K-quants in python; llama.cpp does (checked by test_file_layout)
    assert {quantizer_path(q) for q in QTYPES} <= {"gguf", "llama.cpp"}
    with pytest.raises(ValueError):
        quantizer_path("IQ2_XS")
