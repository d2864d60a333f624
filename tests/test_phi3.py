"""phi3 (Phi-3 / Phi-3.5 / Phi-4-mini) against llama.cpp on tiny synthetic models (tests/phi3_factory.py).

Both engines are measured against our exact float32 forward of the same weights, as
`tests/test_vs_llama_cpp.py` does for the other architectures: on the native step where the type is one it
repacks, and on the torch path (over the same weights) too. Two layouts: Phi-4-mini's (rotary over 3/4 of
each head, LongRoPE factors and attn_factor, tied head) and Phi-3-mini-4k's (full rotary, no factors,
untied head). LongRoPE's long/short choice and its attn_factor are checked against llama.cpp exactly (F32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from native_reference import ContiguousKVCache, NativeBackend  # noqa: E402
from phi3_factory import tiny_phi3_cached  # noqa: E402
from test_vs_llama_cpp import ENGLISH, _argmax_kl  # noqa: E402

from ripelm.kernels import native_lib  # noqa: E402
from ripelm.models.quant_types import QuantType  # noqa: E402
from ripelm.runtime.backend import GenerationStats  # noqa: E402
from ripelm.runtime.llama_cpp_backend import LlamaCppBackend  # noqa: E402
from ripelm.runtime.native_decode import NATIVE_FORMATS  # noqa: E402
from ripelm.runtime.sampling import SamplingParams  # noqa: E402

# Phi-4-mini's shape in small: 3/4 of each head rotates, LongRoPE (long factors at a 512 context, the
# original one being 256) with Phi-3.5's attn_factor sqrt(1 + ln(32) / ln(4096))
PHI4 = dict(rope_dim=48, longrope=True, orig_context=256, attn_factor=1.19)
PHI3 = dict(tied=False)


@pytest.fixture(scope="session")
def phi3_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Callable[..., Path]:
    return functools.partial(tiny_phi3_cached, Path(tmp_path_factory.getbasetemp()) / "phi3_factory")


def _torch_path(backend: NativeBackend) -> None:
    """Run `backend`'s model through the torch forward (over the same weights), not the C step."""
    cfg = backend.cfg
    backend.runner = None
    backend.cache = ContiguousKVCache(
        cfg.n_layers, backend.context_length, cfg.n_kv_heads, cfg.head_dim, dtype=torch.bfloat16
    )


def _llama_logits(path: Path, tokens_of: Callable, n_ctx: int) -> tuple[list[int], torch.Tensor, object]:
    llama = LlamaCppBackend(path, n_ctx=n_ctx, n_threads=2, logits_all=True)
    tokens = tokens_of(llama.tokenizer)
    logits = torch.from_numpy(llama.teacher_forced_logits(tokens)).float()
    llama.close()
    return tokens, logits, llama.tokenizer


CASES = [("phi4", q) for q in ("F32", "Q8_0", "Q4_0", "Q4_K", "Q6_K")] + [("phi3", "Q4_0"), ("phi3", "Q4_K")]


@pytest.mark.parametrize("layout,qtype", CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_tiny_phi3_as_close_to_exact_as_llama_cpp(phi3_model, layout, qtype):
    path = phi3_model(qtype=qtype, **(PHI4 if layout == "phi4" else PHI3))
    tokens, theirs, tok = _llama_logits(path, lambda t: t.encode(ENGLISH, add_bos=False)[:160], 512)
    exact = NativeBackend(path, device="cpu", n_ctx=512, tokenizer=tok, reference=True)
    ref = exact.teacher_forced_logits(tokens)
    exact.close()
    a_theirs, kl_theirs = _argmax_kl(theirs, ref)
    # llama.cpp's own result close to our exact forward: the architecture (LongRoPE included) is the same
    # (a different rotation or FFN split would cost far more than its quantization's ~0.007 nats)
    assert a_theirs >= 0.85 and kl_theirs < 0.02, (a_theirs, kl_theirs)
    native_step = QuantType[qtype] in NATIVE_FORMATS and native_lib.load() is not None
    for path_kind in ("native", "torch") if native_step else ("torch",):
        ours_backend = NativeBackend(path, device="cpu", n_ctx=512, tokenizer=tok)
        assert (ours_backend.runner is not None) == native_step, ours_backend.runner
        if path_kind == "torch":
            _torch_path(ours_backend)
        # one token per forward: each type's decode kernels are what is measured
        ours = ours_backend.teacher_forced_logits(tokens, chunk=1).float()
        ours_backend.close()
        a_ours, kl_ours = _argmax_kl(ours, ref)
        print(
            f"\nphi3 {layout} {qtype} {path_kind}: vs exact fp32, agreement {a_ours:.4f} KL {kl_ours:.5f}; "
            f"llama.cpp agreement {a_theirs:.4f} KL {kl_theirs:.5f}"
        )
        assert kl_ours <= max(1.5 * kl_theirs, 1e-3), (path_kind, kl_ours, kl_theirs)
        # F32: llama.cpp computes exactly; our bf16 activations (the KL allowance above) flip up to ~4% of
        # a tiny random model's near-tied argmaxes
        assert a_ours >= a_theirs - (0.04 if qtype == "F32" else 0.03), (path_kind, a_ours, a_theirs)


def test_longrope_factors_and_attn_factor_as_llama_cpp_applies_them(phi3_model):
    # llama.cpp rotates with the long factors when its context (512) exceeds the original one (256), else
    # with the short ones (256): our exact forward matches it at both, and not with the other factors or
    # without the attn_factor on cos/sin.
    path = phi3_model(qtype="F32", **PHI4)
    runs = {}
    for n_ctx in (512, 256):
        tokens, theirs, tok = _llama_logits(path, lambda t: t.encode(ENGLISH, add_bos=False)[:200], n_ctx)
        exact = NativeBackend(path, device="cpu", n_ctx=n_ctx, tokenizer=tok, reference=True)
        runs[n_ctx] = (theirs, exact.teacher_forced_logits(tokens))
        agree, kl = _argmax_kl(runs[n_ctx][1], theirs)
        assert agree >= 0.99 and kl < 1e-4, (n_ctx, agree, kl)
        if n_ctx == 512:  # the same forward with attn_factor left out
            exact.model.rope_mscale = 1.0
            exact.model._grow_rope(256)
            exact.cache.truncate(0)
            exact.cached_tokens.clear()
            agree, kl = _argmax_kl(exact.teacher_forced_logits(tokens), theirs)
            assert kl > 1e-3, kl
        exact.close()
    # long factors against llama.cpp's short-factor logits and the other way round
    for ours_ctx, theirs_ctx in ((512, 256), (256, 512)):
        agree, kl = _argmax_kl(runs[ours_ctx][1], runs[theirs_ctx][0])
        assert kl > 1e-3, (ours_ctx, kl)


def test_phi3_config_and_tensor_shapes(phi3_model):
    from ripelm.models.config import config_from_gguf, required_tensor_shapes
    from ripelm.models.gguf_file import open_gguf

    g = open_gguf(phi3_model(qtype="Q4_0", **PHI4))
    cfg = config_from_gguf(g)
    g.close()
    assert (cfg.arch, cfg.head_dim, cfg.rope_dim, cfg.rope_scaling_orig_ctx) == ("phi3", 64, 48, 256)
    assert cfg.fused_qkv and cfg.fused_gate_up and cfg.has_longrope and cfg.neox and cfg.tied_embeddings
    assert cfg.rope_attn_factor == pytest.approx(1.19)
    shapes = required_tensor_shapes(cfg)
    assert shapes["blk.1.attn_qkv.weight"] == (256, 256 + 2 * 128)
    assert shapes["blk.1.ffn_up.weight"] == (256, 2 * 512)
    assert shapes["rope_factors_long.weight"] == shapes["rope_factors_short.weight"] == (24,)
    assert "blk.0.ffn_gate.weight" not in shapes and "blk.0.attn_q.weight" not in shapes


def _greedy(backend, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    out: list[int] = []
    for tok in backend.generate_ids(prompt, SamplingParams(temperature=0.0, max_tokens=n), GenerationStats()):
        out.append(tok)
        if len(out) == n:
            break
    return out


def test_tiny_phi3_paged_engine_matches_single_sequence(phi3_model):
    # The batched engine (paged pool, native step) continues a prompt as the single-sequence backend does.
    from ripelm.runtime.engine_backend import EngineBackend

    path = phi3_model(qtype="Q8_0", **PHI4)
    single = NativeBackend(path, device="cpu", n_ctx=512)
    prompt = single.tokenizer.encode(ENGLISH)[:100]
    want = _greedy(single, prompt, 40)
    single.close()
    engine = EngineBackend(path, device="cpu", n_ctx=512, kv_memory=16 << 20)
    got = _greedy(engine, prompt, 40)
    engine.close()
    assert got == want
