"""The native CPU library: each kernel against its reference on every instruction-set path this CPU has,
the whole decode step against the exact float32 forward, batch invariance, and the torch fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from ripelm.kernels import native_lib

lib = native_lib.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"native library: {native_lib.why_not()}")
ISAS = native_lib.available_isas(lib) if lib is not None else []
GGML = {
    "Q4_0": GGMLQuantizationType.Q4_0,
    "Q4_1": GGMLQuantizationType.Q4_1,
    "Q8_0": GGMLQuantizationType.Q8_0,
    "TQ1_0": GGMLQuantizationType.TQ1_0,
    "TQ2_0": GGMLQuantizationType.TQ2_0,
}
FMT = {
    "Q4_0": native_lib.FMT_Q4_0,
    "Q4_1": native_lib.FMT_Q4,
    "Q8_0": native_lib.FMT_Q8,
    "TQ1_0": native_lib.FMT_T2,
    "TQ2_0": native_lib.FMT_T2,
}


def _quantize_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The activation rounding every path must reproduce bit for bit: int8 per 32, scale amax / 127."""
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(b * inv[:, None]).astype(np.int8)
    d = (amax / np.float32(127)).astype(np.float32)
    return q.reshape(-1), d, d * q.sum(-1).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
def test_activation_quantization_is_exact_on_every_path(isa):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(32 * 40) * rng.uniform(0.01, 50, 32 * 40)).astype(np.float32)
    x[:32] = 0  # an all-zero block
    x[32:64] = 0.5 * 127 / 127  # ties: every value rounds half to even the same way
    q, d, s = np.empty(x.size, np.int8), np.empty(40, np.float32), np.empty(40, np.float32)
    assert (
        lib.rl_test_quantize(isa, x.ctypes.data, x.size, q.ctypes.data, d.ctypes.data, s.ctypes.data) == isa
    )
    rq, rd, rs = _quantize_act(x)
    assert np.array_equal(q, rq)
    assert np.array_equal(d, rd)
    np.testing.assert_allclose(s, rs, rtol=1e-6)


def _random_weight(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF blocks of a random [n, k] weight and the float32 weight they decode to."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 0.2, (n, 1))).astype(np.float32)
    raw = quants.quantize(w, GGML[qtype])
    return raw, quants.dequantize(raw, GGML[qtype]).reshape(n, k).astype(np.float32)


def _random_ternary_blocks(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random TQ1_0 / TQ2_0 blocks (every byte pattern is a valid code; TQ2_0's stray code 3 included) with
    random fp16 scales, and the float32 weight gguf decodes them to."""
    rng = np.random.default_rng(seed)
    size = 54 if qtype == "TQ1_0" else 66
    raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    d = rng.uniform(0.001, 0.1, (n, k // 256)).astype(np.float16)
    raw[:, :, size - 2 :] = d[..., None].view(np.uint8)
    raw = raw.reshape(n, -1)
    return raw, quants.dequantize(raw, GGML[qtype]).reshape(n, k).astype(np.float32)


def _matvec(isa: int, qtype: str, raw: np.ndarray, n: int, k: int, x: np.ndarray) -> np.ndarray:
    packed = np.empty(lib.rl_repacked_size(int(GGML[qtype]), n, k), np.uint8)
    assert packed.size > 0
    assert lib.rl_repack(int(GGML[qtype]), raw.ctypes.data, n, k, packed.ctypes.data) == 0
    rows = x.shape[0]
    out = np.zeros((rows, (n + 7) // 8 * 8), np.float32)
    assert (
        lib.rl_test_matvec(isa, FMT[qtype], packed.ctypes.data, n, k, x.ctypes.data, rows, out.ctypes.data)
        == isa
    )
    return out


def _check_exact_product(out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    rows, k = x.shape
    n = w.shape[0]
    q, d, _ = _quantize_act(x.reshape(-1))
    xq = (q.reshape(-1, 32).astype(np.float64) * d[:, None]).reshape(rows, k)
    exact = xq @ w.astype(np.float64).T
    # Only float32 accumulation order separates the kernels from the float64 product of the same
    # rounded operands; against the unrounded activations the int8 rounding shows (about 0.4%).
    np.testing.assert_allclose(out[:, :n], exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    err = np.abs(out[:, :n] - x.astype(np.float64) @ w.T).max() / np.abs(exact).max()
    assert err < 0.02


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "TQ1_0", "TQ2_0"])
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
@pytest.mark.parametrize("n", [64, 100])  # 100: not a multiple of the 8-row groups (padding)
@pytest.mark.parametrize("rows", [3, 9])  # 9: tiles of four activation rows and a remainder
def test_matvec_matches_the_exact_product_of_the_rounded_operands(qtype, isa, n, rows):
    k = 512 if qtype.startswith("TQ") else 256  # ternary blocks are 256 wide: two of them
    raw, w = _random_weight(qtype, n, k, seed=n)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    _check_exact_product(_matvec(isa, qtype, raw, n, k, x), x, w)


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
@pytest.mark.parametrize("rows", [1, 35])  # 35: more than one 32-row tile of activations
def test_ternary_matvec_on_random_blocks(qtype, isa, rows):
    n, k = 40, 768
    raw, w = _random_ternary_blocks(qtype, n, k, seed=rows)
    x = np.random.default_rng(2).standard_normal((rows, k)).astype(np.float32)
    _check_exact_product(_matvec(isa, qtype, raw, n, k, x), x, w)


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
@pytest.mark.parametrize("source", ["quantized", "random blocks"])
def test_ternary_repack_round_trip(qtype, source):
    """Rows read back from the repacked layout equal the GGUF dequantization exactly (gguf's and ours)."""
    from ripelm.kernels.dequant import dequantize

    n, k = 21, 512
    if source == "quantized":
        raw, w = _random_weight(qtype, n, k, seed=5)
    else:
        raw, w = _random_ternary_blocks(qtype, n, k, seed=5)
    assert np.array_equal(dequantize(raw, int(GGML[qtype]), (n, k)).numpy(), w)
    packed = np.empty(lib.rl_repacked_size(int(GGML[qtype]), n, k), np.uint8)
    assert packed.size == (n + 7) // 8 * (k // 256) * 528  # 2.06 bits per weight
    assert lib.rl_repack(int(GGML[qtype]), raw.ctypes.data, n, k, packed.ctypes.data) == 0
    full = np.empty((n, k), np.float32)
    assert lib.rl_dequant(1, FMT[qtype], packed.ctypes.data, n, k, full.ctypes.data) == 0
    assert np.array_equal(full, w)
    ids = np.array([20, 0, 7, 8, 13], np.int64)
    some = np.empty((ids.size, k), np.float32)
    lib.rl_gather_rows(FMT[qtype], packed.ctypes.data, k, ids.ctypes.data, ids.size, some.ctypes.data)
    assert np.array_equal(some, w[ids])


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
def test_vector_exp_is_accurate(isa):
    x = np.linspace(-87, 88, 4001, dtype=np.float32)
    y = x.copy()
    lib.rl_test_exp(isa, y.ctypes.data, y.size)
    np.testing.assert_allclose(y, np.exp(x.astype(np.float64)), rtol=4e-7)


@pytest.mark.parametrize("kv_f16", [True, False], ids=["f16", "bf16"])
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
@pytest.mark.parametrize("n_keys", [1, 13, 200])
# head_dim 64 has its own AVX2 kernel (query heads in passes of three); other widths the generic one
@pytest.mark.parametrize("g,d", [(3, 64), (4, 64), (7, 64), (2, 128), (5, 40)])
def test_attention_range_matches_softmax_reference(isa, kv_f16, n_keys, g, d):
    rng = np.random.default_rng(n_keys)
    q = rng.standard_normal((g, d)).astype(np.float32)
    kf = rng.standard_normal((n_keys, d)).astype(np.float32)
    vf = rng.standard_normal((n_keys, d)).astype(np.float32)
    if kv_f16:
        k16, v16 = kf.astype(np.float16), vf.astype(np.float16)
        kq, vq = k16.astype(np.float64), v16.astype(np.float64)
        k16, v16 = k16.view(np.uint16), v16.view(np.uint16)
    else:
        k16 = torch.from_numpy(kf).bfloat16().view(torch.uint16).numpy()
        v16 = torch.from_numpy(vf).bfloat16().view(torch.uint16).numpy()
        kq = torch.from_numpy(kf).bfloat16().double().numpy()
        vq = torch.from_numpy(vf).bfloat16().double().numpy()
    m, lsum, acc = np.empty(g, np.float32), np.empty(g, np.float32), np.empty((g, d), np.float32)
    scale = d**-0.5
    rc = lib.rl_test_attn(
        isa,
        q.ctypes.data,
        g,
        d,
        k16.ctypes.data,
        v16.ctypes.data,
        n_keys,
        int(kv_f16),
        scale,
        m.ctypes.data,
        lsum.ctypes.data,
        acc.ctypes.data,
    )
    assert rc == isa
    scores = q.astype(np.float64) @ kq.T * scale
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (p @ vq) / p.sum(-1, keepdims=True)
    np.testing.assert_allclose(acc / lsum[:, None], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, scores.max(-1), rtol=1e-5, atol=1e-5)


def _backend(path, **kw):
    from ripelm.runtime.native import NativeBackend

    return NativeBackend(path, device="cpu", n_ctx=512, **kw)


@pytest.mark.parametrize(
    "arch,qtype",
    [
        ("llama", "Q4_0"),
        ("llama", "Q4_1"),
        ("llama", "Q8_0"),
        ("qwen2", "Q4_0"),
        ("qwen3", "Q8_0"),
        ("llama", "TQ1_0"),  # ternary projections (RL_T2), Q8_0 embedding and head (gguf_factory)
        ("llama", "TQ2_0"),
    ],
)
def test_native_step_tracks_the_exact_forward(tiny_model_factory, arch, qtype):
    path = tiny_model_factory(arch=arch, qtype=qtype)
    native = _backend(path)
    assert native.runner is not None, "the tiny model should run on the native step"
    exact = _backend(path, reference=True, tokenizer=native.tokenizer)
    tokens = native.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6, add_bos=False)[:64]
    ref = exact.teacher_forced_logits(tokens)
    one = native.teacher_forced_logits(tokens, chunk=1)  # decode: one row per step
    few = native.teacher_forced_logits(tokens, chunk=7)  # several rows of one sequence per step
    many = native.teacher_forced_logits(tokens, chunk=64)  # a prefill longer than one native step
    for ours in (one, few, many):
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        assert kl < 5e-3, kl
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # a row's result does not depend on how many rows share its step
    torch.testing.assert_close(one, few, rtol=0, atol=0)
    if native.runner.prefills:  # long prefills run natively here (no bf16 matrix unit): the same rows
        torch.testing.assert_close(one, many, rtol=0, atol=0)


def test_every_isa_path_tracks_the_exact_forward_on_the_bundled_model(bundled_model_path):
    """The whole step on each instruction-set path this CPU has, against the exact float32 model. (The
    paths differ in float summation order; int8 rounding turns that into small logit differences, so
    each is checked against the exact forward, not bit for bit against the others.)"""
    exact = _backend(bundled_model_path, reference=True)
    text = "The capital of France is Paris. It lies on the Seine, and its museums draw millions each year."
    tokens = exact.tokenizer.encode(text, add_bos=False)
    ref = exact.teacher_forced_logits(tokens)
    for isa in ISAS:
        b = _backend(bundled_model_path, tokenizer=exact.tokenizer)
        b.runner.isa = lib.rl_model_set_isa(b.runner.handle, isa)
        assert b.runner.isa == isa
        ours = b.teacher_forced_logits(tokens, chunk=1)
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        assert kl < 0.01, (native_lib.ISA_NAMES[isa], kl)
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_without_the_library_everything_runs_on_torch_with_one_notice(tmp_path, bundled_model_path):
    code = (
        "import sys\n"
        "from ripelm.runtime.engine_backend import EngineBackend\n"
        "from ripelm.runtime.backend import GenerationStats\n"
        "from ripelm.runtime.sampling import SamplingParams\n"
        f"b = EngineBackend({str(bundled_model_path)!r}, device='cpu', n_ctx=256, kv_memory=8 << 20)\n"
        "assert b.engine.native is None\n"
        "ids = b.tokenizer.encode('Hello', add_bos=False)\n"
        "params = SamplingParams(temperature=0, max_tokens=5)\n"
        "print(len(list(b.generate_ids(ids, params, GenerationStats()))))\n"
        "b.close()\n"
    )
    env = {**os.environ, "RIPELM_NATIVE": "0", "RIPELM_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "5"
    notices = [line for line in r.stderr.splitlines() if "native CPU decode step not used" in line]
    assert len(notices) == 1 and "RIPELM_NATIVE=0" in notices[0]
