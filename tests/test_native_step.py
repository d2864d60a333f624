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
FMT = {
    "Q4_0": native_lib.FMT_Q4_0,
    "Q4_1": native_lib.FMT_Q4,
    "Q4_K": native_lib.FMT_Q4,
    "Q5_0": native_lib.FMT_Q5,
    "Q5_1": native_lib.FMT_Q5,
    "Q5_K": native_lib.FMT_Q5,
    "Q6_K": native_lib.FMT_Q6,
    "Q8_0": native_lib.FMT_Q8,
    "TQ1_0": native_lib.FMT_T2,
    "TQ2_0": native_lib.FMT_T2,
}
GGML = {name: GGMLQuantizationType[name] for name in FMT}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


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
    h = np.empty(80, np.int32)
    rc = lib.rl_test_quantize(
        isa, x.ctypes.data, x.size, q.ctypes.data, d.ctypes.data, s.ctypes.data, h.ctypes.data
    )
    assert rc == isa
    rq, rd, rs = _quantize_act(x)
    assert np.array_equal(q, rq)
    assert np.array_equal(d, rd)
    np.testing.assert_allclose(s, rs, rtol=1e-6)
    # the integer sums of each half block (RL_Q6's code offset)
    assert np.array_equal(h, rq.reshape(-1, 16).astype(np.int32).sum(-1))


def _half_bytes(rng: np.random.Generator, count: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, count).astype(np.float16).view(np.uint8).reshape(count, 2)


def _random_k_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant blocks with every bit random (codes, all 6 bits of the scales and mins, int8 Q6_K
    scales of either sign) but the fp16 scales, which are kept finite (the gguf package cannot quantize
    to K-quants)."""
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    count = n * k // 256
    raw = rng.integers(0, 256, (count, size), dtype=np.uint8)
    if qtype == "Q6_K":
        raw[:, 208:210] = _half_bytes(rng, count, 1e-4, 1e-3)
    else:  # d, dmin
        raw[:, 0:2] = _half_bytes(rng, count, 1e-4, 1e-3)
        raw[:, 2:4] = _half_bytes(rng, count, 1e-4, 2e-3)
    return raw.reshape(-1)


def _random_weight(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF blocks of a random [n, k] weight and the float32 weight they decode to."""
    rng = np.random.default_rng(seed)
    if qtype in K_QUANTS:
        raw = _random_k_blocks(qtype, n, k, rng)
    else:
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


def _matvec(
    isa: int, qtype: str, raw: np.ndarray, n: int, k: int, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's product of x with the repacked raw blocks, and the repacked weights as float32."""
    packed = np.empty(lib.rl_repacked_size(int(GGML[qtype]), n, k), np.uint8)
    assert packed.size > 0
    assert lib.rl_format_of(int(GGML[qtype])) == FMT[qtype]
    assert lib.rl_repack(int(GGML[qtype]), raw.ctypes.data, n, k, packed.ctypes.data) == 0
    ids = np.arange(n, dtype=np.int64)
    wr = np.empty((n, k), np.float32)
    lib.rl_gather_rows(FMT[qtype], packed.ctypes.data, k, ids.ctypes.data, n, wr.ctypes.data)
    whole = np.empty((n, k), np.float32)
    assert lib.rl_dequant(1, FMT[qtype], packed.ctypes.data, n, k, whole.ctypes.data) == 0
    assert np.array_equal(whole, wr)
    rows = x.shape[0]
    out = np.zeros((rows, (n + 7) // 8 * 8), np.float32)
    assert (
        lib.rl_test_matvec(isa, FMT[qtype], packed.ctypes.data, n, k, x.ctypes.data, rows, out.ctypes.data)
        == isa
    )
    return out, wr


def _check_exact_product(out: np.ndarray, x: np.ndarray, w: np.ndarray, wr: np.ndarray) -> None:
    """out against the float64 product of the same rounded operands (activations as the kernels round
    them, the repacked weights wr); against the unrounded activations and the GGUF weights w the int8
    rounding shows (about 0.4%)."""
    rows, k = x.shape
    n = w.shape[0]
    q, d, _ = _quantize_act(x.reshape(-1))
    xq = (q.reshape(-1, 32).astype(np.float64) * d[:, None]).reshape(rows, k)
    exact = xq @ wr.astype(np.float64).T
    for r in range(rows):
        np.testing.assert_allclose(out[r, :n], exact[r], rtol=1e-4, atol=1e-4 * np.abs(exact[r]).max())
        err = np.abs(out[r, :n] - x[r].astype(np.float64) @ w.T.astype(np.float64)).max()
        assert err / np.abs(exact[r]).max() < 0.02
    assert not out[:, n:].any()  # padding rows are zero


def _folded_scale_rounding(qtype: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n, k] bound on |repacked - GGUF| of each weight from rounding the folded K-quant scales (d * sc,
    dmin * min) to fp16 once: a relative 2^-11 of each term (0 for the other types, which keep their
    scales)."""
    if qtype not in K_QUANTS:
        return np.zeros((n, k))
    from ripelm.kernels.dequant import _k_scales_mins

    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    b = raw.reshape(-1, size)
    if qtype == "Q6_K":  # |code - 32| <= 32, a scale per 16
        d = b[:, 208:210].copy().view(np.float16).astype(np.float64)
        sc = b[:, 192:208].view(np.int8).astype(np.float64)
        bound = np.repeat(np.abs(d * sc) * 32, 16, axis=-1)
    else:  # codes <= 31, a scale and a min per 32
        d = b[:, 0:2].copy().view(np.float16).astype(np.float64)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float64)
        sc, mn = (t.numpy().astype(np.float64) for t in _k_scales_mins(torch.from_numpy(b[:, 4:16].copy())))
        bound = np.repeat(d * sc * 31 + dmin * mn, 32, axis=-1)
    return bound.reshape(n, k) * 2.0**-11 * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("qtype", list(FMT))
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
@pytest.mark.parametrize("n", [64, 100])  # 100: not a multiple of the 8-row groups (padding)
@pytest.mark.parametrize("rows", [3, 9])  # 9: tiles of four activation rows and a remainder
def test_matvec_matches_the_exact_product_of_the_rounded_operands(qtype, isa, n, rows):
    k = 512
    raw, w = _random_weight(qtype, n, k, seed=n)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    x[1] *= 40  # activations of any scale
    x[2, :32] = 0  # an all-zero block
    out, wr = _matvec(isa, qtype, raw, n, k, x)
    # the repacked weights: the GGUF ones, but for the one fp16 rounding of a K-quant's folded scales
    err = np.abs(wr.astype(np.float64) - w)
    assert (err <= _folded_scale_rounding(qtype, raw, n, k)).all(), err.max()
    if qtype not in K_QUANTS:
        assert np.array_equal(wr, w)
    _check_exact_product(out, x, w, wr)


@pytest.mark.parametrize("qtype", list(FMT))
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
def test_matvec_rows_of_a_batch_equal_each_row_alone(qtype, isa):
    """40 activation rows in one call (the kernels' tiles of 32 and a remainder), bit for bit as one each."""
    n, k, rows = 24, 256, 40
    raw, _ = _random_weight(qtype, n, k, seed=5)
    packed = np.empty(lib.rl_repacked_size(int(GGML[qtype]), n, k), np.uint8)
    assert lib.rl_repack(int(GGML[qtype]), raw.ctypes.data, n, k, packed.ctypes.data) == 0
    x = np.random.default_rng(2).standard_normal((rows, k)).astype(np.float32)
    out = np.zeros((rows, n), np.float32)
    lib.rl_test_matvec(isa, FMT[qtype], packed.ctypes.data, n, k, x.ctypes.data, rows, out.ctypes.data)
    for r in (0, 1, 31, 32, 39):
        one = np.zeros((1, n), np.float32)
        xr = np.ascontiguousarray(x[r : r + 1])
        lib.rl_test_matvec(isa, FMT[qtype], packed.ctypes.data, n, k, xr.ctypes.data, 1, one.ctypes.data)
        assert np.array_equal(one[0], out[r])


@pytest.mark.parametrize("qtype", ["Q5_K", "Q6_K"])
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
def test_matvec_holds_the_largest_codes_and_activations(qtype, isa):
    """Every code at its maximum against activations of +-127 (the sums that could overflow 16 bits)."""
    n, k, rows = 16, 256, 2
    raw = _random_k_blocks(qtype, n, k, np.random.default_rng(7)).reshape(n * k // 256, -1)
    if qtype == "Q5_K":
        raw[:, 16:176] = 0xFF  # qh and qs: every code 31
        raw[:, 4:16] = 0xFF  # scales and mins 63
    else:
        raw[:, 0:192] = 0xFF  # every code 63
        raw[:, 192:208] = 127
    raw = raw.reshape(-1)
    packed = np.empty(lib.rl_repacked_size(int(GGML[qtype]), n, k), np.uint8)
    assert lib.rl_repack(int(GGML[qtype]), raw.ctypes.data, n, k, packed.ctypes.data) == 0
    wr = np.empty((n, k), np.float32)
    ids = np.arange(n, dtype=np.int64)
    lib.rl_gather_rows(FMT[qtype], packed.ctypes.data, k, ids.ctypes.data, n, wr.ctypes.data)
    x = np.ones((rows, k), np.float32)
    x[1, 1::2] = -1
    out = np.zeros((rows, n), np.float32)
    rc = lib.rl_test_matvec(isa, FMT[qtype], packed.ctypes.data, n, k, x.ctypes.data, rows, out.ctypes.data)
    assert rc == isa
    q, d, _ = _quantize_act(x.reshape(-1))
    assert np.abs(q).min() == 127
    exact = (q.reshape(-1, 32).astype(np.float64) * d[:, None]).reshape(rows, k) @ wr.astype(np.float64).T
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
@pytest.mark.parametrize("rows", [1, 35])  # 35: more than one 32-row tile of activations
def test_ternary_matvec_on_random_blocks(qtype, isa, rows):
    n, k = 40, 768
    raw, w = _random_ternary_blocks(qtype, n, k, seed=rows)
    x = np.random.default_rng(2).standard_normal((rows, k)).astype(np.float32)
    out, wr = _matvec(isa, qtype, raw, n, k, x)
    assert np.array_equal(wr, w)
    _check_exact_product(out, x, w, wr)


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
    from native_reference import NativeBackend

    return NativeBackend(path, device="cpu", n_ctx=512, **kw)


# Types within one layer as llama.cpp's Q4_K_M mixes them (Q, K, V of three formats), on qwen2 for the Q/K/V
# biases of the split projection
MIXED = (
    ("attn_q", "Q5_0"),
    ("attn_k", "Q5_1"),
    ("attn_v", "Q8_0"),
    ("ffn_gate", "Q5_0"),
    ("ffn_down", "Q4_1"),
)


def _layer_formats(native) -> list[int]:  # noqa: ANN001 - a NativeBackend
    lw = native.runner.weights.layers[0]
    return [p.fmt for p in lw["qkv"]] + [lw[x].fmt for x in ("wo", "gate", "up", "down")]


@pytest.mark.parametrize(
    "arch,qtype,types",
    [
        ("llama", "Q4_0", ()),
        ("llama", "Q4_1", ()),
        ("llama", "Q8_0", ()),
        ("qwen2", "Q4_0", ()),
        ("qwen3", "Q8_0", ()),
        ("llama", "Q5_0", ()),
        ("qwen3", "Q5_1", ()),
        ("llama", "Q4_K", ()),  # llama.cpp's Q4_K_M: Q4_K with Q6_K for V and some ffn_down
        ("llama", "Q5_K", ()),  # Q5_K_M: Q5_K with Q6_K
        ("llama", "Q6_K", ()),
        ("qwen2", "Q4_K", ()),
        ("qwen2", "Q4_0", MIXED),
        ("llama", "TQ1_0", ()),  # ternary projections (RL_T2), Q8_0 embedding and head (gguf_factory)
        ("llama", "TQ2_0", ()),
    ],
    ids=lambda v: "mixed" if v == MIXED else (str(v) if v else ""),
)
def test_native_step_tracks_the_exact_forward(tiny_model_factory, arch, qtype, types):
    path = tiny_model_factory(arch=arch, qtype=qtype, tensor_types=types)
    native = _backend(path)
    assert native.runner is not None, "the tiny model should run on the native step"
    if types:
        q4, q4_0, q5, q8 = native_lib.FMT_Q4, native_lib.FMT_Q4_0, native_lib.FMT_Q5, native_lib.FMT_Q8
        assert _layer_formats(native) == [q5, q5, q8, q4_0, q5, q4_0, q4]  # q, k, v apart; wo, gate, up, down
    exact = _backend(path, reference=True, tokenizer=native.tokenizer)
    tokens = native.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6, add_bos=False)[:64]
    ref = exact.teacher_forced_logits(tokens)
    one = native.teacher_forced_logits(tokens, chunk=1)  # decode: one row per step
    few = native.teacher_forced_logits(tokens, chunk=7)  # several rows of one sequence per step
    many = native.teacher_forced_logits(tokens, chunk=64)  # a prefill longer than one native step
    prefills, native.runner.prefills = native.runner.prefills, False
    dense = native.teacher_forced_logits(tokens, chunk=64)  # torch's matmuls over the repacked weights
    native.runner.prefills = prefills
    # Argmax agreement where the exact top two are not near-tied: a tiny random model has many near ties
    # (the Q4_K one: 13% of positions within 0.05), which the int8 activations' rounding flips either way.
    top2 = ref.topk(2, -1).values
    decisive = top2[:, 0] - top2[:, 1] > 0.1
    for ours in (one, few, many, dense):
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        assert kl < 5e-3, kl
        assert (ours.argmax(-1) == ref.argmax(-1))[decisive].float().mean() >= 0.9
    # a row's result does not depend on how many rows share its step
    torch.testing.assert_close(one, few, rtol=0, atol=0)
    if native.runner.prefills:  # long prefills run natively here (no bf16 matrix unit): the same rows
        torch.testing.assert_close(one, many, rtol=0, atol=0)


def test_mixed_formats_a_row_computes_the_same_alone_and_in_a_batch(tiny_model_factory):
    """Rows of two sequences in one step, against each row alone, bit for bit, on a model whose Q, K and V
    are three parts of different formats (their groups split over the threads as one range)."""
    path = tiny_model_factory(arch="qwen2", qtype="Q4_0", tensor_types=MIXED)
    native = _backend(path)
    runner = native.runner
    assert len(runner.weights.layers[0]["qkv"]) == 3
    # the torch path's [q | k | v] weight (long prefills where the CPU multiplies bf16 in hardware) from
    # the three parts: the file's weights exactly
    from ripelm.kernels.dequant import dequantize
    from ripelm.models.gguf_file import open_gguf

    g = open_gguf(path)
    infos = [g.tensors[f"blk.0.attn_{x}.weight"] for x in "qkv"]
    parts = [dequantize(g.tensor_bytes(i.name), i.ggml_type, i.torch_shape) for i in infos]
    g.close()
    assert torch.equal(native.model.layers[0].wqkv.weight(), torch.cat(parts))
    ids = native.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4, add_bos=False)
    seqs = [ids[:19], ids[19:45], ids[3:10]]
    bs = runner.cache.block_size
    tables, first = [], 2  # blocks 0 and 1 took the warm-up step
    for s in seqs:
        tables.append(list(range(first, first + -(-len(s) // bs))))
        first += len(tables[-1])
    assert first <= runner.cache.allocator.num_blocks

    def embed(tokens: list[int]) -> torch.Tensor:
        return native.model.embed(torch.tensor(tokens)).float()

    alone = []
    for s, t in zip(seqs, tables, strict=True):  # each sequence's history, then its last row alone
        runner.forward(embed(s[:-1]), list(range(len(s) - 1)), [t] * (len(s) - 1), [])
        alone.append(runner.forward(embed(s[-1:]), [len(s) - 1], [t], [0])[0])
    last = [s[-1] for s in seqs]
    together, _ = runner.forward(embed(last), [len(s) - 1 for s in seqs], tables, [0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], alone[i], rtol=0, atol=0)
    two, _ = runner.forward(embed(last[1:]), [len(s) - 1 for s in seqs[1:]], tables[1:], [1])
    torch.testing.assert_close(two, alone[2], rtol=0, atol=0)


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


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native_lib.ISA_NAMES[i])
@pytest.mark.parametrize("g,rows", [(3, 5), (7, 9), (2, 16)])
def test_grouped_attention_gives_each_row_its_bits_alone(isa, g, rows):
    """The grouped kernel (rows of one sequence over one K/V head, each key converted once) against each row
    through the single-row kernel, on every path with a grouped kernel: zero differing bits, with rows whose
    ranges start (a sliding window) and end (their own positions) at different keys."""
    rng = np.random.default_rng(rows)
    d, n = 64, 150
    q = rng.standard_normal((rows, g, d)).astype(np.float32)
    k16 = rng.standard_normal((n, d)).astype(np.float16).view(np.uint16)
    v16 = rng.standard_normal((n, d)).astype(np.float16).view(np.uint16)
    k1 = np.array([n - rows + 1 + r for r in range(rows)], np.int32)
    k0 = np.array([0 if r < 2 else 4 * r for r in range(rows)], np.int32)
    diff = lib.rl_test_attn_rows(
        isa,
        q.ctypes.data,
        rows,
        g,
        d,
        k16.ctypes.data,
        v16.ctypes.data,
        k0.ctypes.data,
        k1.ctypes.data,
        1,
        0.125,
    )
    if diff == -1 and native_lib.ISA_NAMES[isa] == "reference C":
        pytest.skip("the reference path has no grouped kernel: rows attend one at a time")
    assert diff == 0


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("gemma3", "Q8_0")])
def test_rows_of_one_sequence_attend_together_bit_for_bit_as_each_row_alone(tiny_model_factory, arch, qtype):
    """Rows of one sequence at consecutive positions in one step (a speculative verify, a prompt chunk)
    attend as one group, each key read once for all rows (attn_rows where the CPU has it): every row's
    logits are bit for bit those of the same row stepped alone, across an attention range boundary
    (ATTN_CHUNK = 128 keys) and, on gemma3, past the local layers' window (rows of one group then start
    their ranges at different keys)."""
    path = tiny_model_factory(arch=arch, qtype=qtype)
    native = _backend(path)
    runner = native.runner
    ids = native.tokenizer.encode("Paged attention keeps the cache in blocks. " * 20, add_bos=False)[:150]
    assert len(ids) == 150
    bs = runner.cache.block_size
    n_blocks = -(-len(ids) // bs)
    alone_table, group_table = list(range(2, 2 + n_blocks)), list(range(2 + n_blocks, 2 + 2 * n_blocks))
    assert 2 + 2 * n_blocks <= runner.cache.allocator.num_blocks

    def embed(tokens: list[int]) -> torch.Tensor:
        return native.model.embed(torch.tensor(tokens)).float()

    alone = [runner.forward(embed([t]), [p], [alone_table], [0])[0] for p, t in enumerate(ids)]
    runner.forward(embed(ids[:118]), list(range(118)), [group_table] * 118, [])
    for start, stop in ((118, 127), (127, 140), (140, 150)):  # k + 1 rows of a verify, around the boundary
        n = stop - start
        rows = list(range(start, stop))
        logits, _ = runner.forward(embed(ids[start:stop]), rows, [group_table] * n, list(range(n)))
        for i in range(n):
            torch.testing.assert_close(logits[i : i + 1], alone[start + i], rtol=0, atol=0)
