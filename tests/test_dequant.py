"""Torch dequantisers and the 4-bit code/scale/offset split, checked against gguf's numpy reference."""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from ripelm.kernels.dequant import (
    DEQUANT_TYPES,
    Q4_TYPES,
    dequantize,
    dequantize_rows,
    q4_codes_scales_offsets,
)
from ripelm.kernels.quant_types import BLOCK_LAYOUT, QuantType, quant_type, row_bytes, tensor_bytes

QT = QuantType
# Types gguf's numpy code can quantise, so tests can start from real weights.
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.TQ1_0, QT.TQ2_0]
# Byte offsets of the fp16 scale fields in each block format; random block bytes get these overwritten with
# small finite values so the reference does not produce inf/nan.
FP16_FIELDS = {
    QT.Q4_0: [0],
    QT.Q4_1: [0, 2],
    QT.Q5_0: [0],
    QT.Q5_1: [0, 2],
    QT.Q8_0: [0],
    QT.Q2_K: [80, 82],
    QT.Q3_K: [108],
    QT.Q4_K: [0, 2],
    QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
    QT.TQ1_0: [52],
    QT.TQ2_0: [64],
}
BLOCK_TYPES = list(FP16_FIELDS)


def _weights(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _random_blocks(qt: QuantType, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random raw blocks for `shape`, as gguf lays them out: uint8 [*shape[:-1], row_bytes]."""
    rng = np.random.default_rng(seed)
    _, type_size = BLOCK_LAYOUT[qt]
    n_blocks = tensor_bytes(qt, shape) // type_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in FP16_FIELDS[qt]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*shape[:-1], row_bytes(qt, shape[-1]))


def _raw(qt: QuantType, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Raw bytes for `shape`: real quantised weights where gguf can make them, random blocks otherwise."""
    if qt in QUANTIZABLE:
        return ref_quantize(_weights(shape, seed), gguf.GGMLQuantizationType(qt))
    return _random_blocks(qt, shape, seed)


def _reference(raw: np.ndarray, qt: QuantType, shape: tuple[int, ...]) -> torch.Tensor:
    if qt == QT.BF16:
        # gguf's BF16 reference wants the raw bytes; the others accept what quantize() returned.
        raw = raw.view(np.uint8)
    out = ref_dequantize(raw, gguf.GGMLQuantizationType(qt))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    if want.numel():
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def _as_flat_bytes(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)


# --- the type table ---------------------------------------------------------------------------------------


def test_type_ids_and_layouts_match_gguf() -> None:
    for qt in QuantType:
        ref = gguf.GGMLQuantizationType[qt.name]
        assert int(ref) == int(qt)
        assert BLOCK_LAYOUT[qt] == gguf.GGML_QUANT_SIZES[ref]
    assert set(BLOCK_LAYOUT) == set(QuantType)


def test_unknown_and_unsupported_types_raise_value_error() -> None:
    with pytest.raises(ValueError, match="unknown GGML tensor type id 4"):
        quant_type(4)
    with pytest.raises(ValueError, match="unknown"):
        dequantize(np.zeros(64, np.uint8), 99, (2, 32))
    assert quant_type(gguf.GGMLQuantizationType.Q4_K) is QT.Q4_K
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), gguf.GGMLQuantizationType.IQ2_XXS, (1, 256))
    with pytest.raises(ValueError, match="Q8_0"):
        q4_codes_scales_offsets(np.zeros(34, np.uint8), QT.Q8_0, (1, 32))


def test_row_and_tensor_bytes() -> None:
    assert row_bytes(QT.Q4_0, 64) == 36
    assert row_bytes(QT.F32, 7) == 28
    assert tensor_bytes(QT.Q8_0, (3, 64)) == 3 * 68
    assert tensor_bytes(QT.Q6_K, (2, 3, 512)) == 6 * 420
    assert tensor_bytes(QT.F16, (5,)) == 10
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        row_bytes(QT.Q4_K, 576)
    with pytest.raises(ValueError):
        dequantize(np.zeros(100, np.uint8), QT.Q4_0, (2, 48))


# --- dequantize against gguf ------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(6, 512), (2, 3, 768), (1024,)])
def test_dequantize_quantized_weights_match_gguf(qt: QuantType, shape: tuple[int, ...]) -> None:
    raw = _raw(qt, shape)
    got = dequantize(_as_flat_bytes(raw), qt, shape)
    _assert_close(got, _reference(raw, qt, shape))


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(5, 512), (2, 3, 768)])
def test_dequantize_random_blocks_match_gguf(qt: QuantType, shape: tuple[int, ...]) -> None:
    # Random bytes reach every bit pattern, including ones a quantiser never writes.
    raw = _random_blocks(qt, shape, seed=1)
    got = dequantize(torch.from_numpy(_as_flat_bytes(raw)), qt, shape)
    _assert_close(got, _reference(raw, qt, shape))


def test_supported_type_sets() -> None:
    assert set(QUANTIZABLE) | set(BLOCK_TYPES) == set(DEQUANT_TYPES)
    assert Q4_TYPES == {QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.TQ1_0, QT.TQ2_0}


# --- input handling ---------------------------------------------------------------------------------------


def test_read_only_memmap_input(tmp_path) -> None:
    shape = (4, 256)
    raws = {qt: _as_flat_bytes(_raw(qt, shape)) for qt in (QT.F32, QT.Q8_0, QT.Q4_K)}
    path = tmp_path / "blob.bin"
    # An odd-sized header puts the tensors at unaligned offsets, as a sloppy slice of a file could.
    header = b"\x01\x02\x03"
    with open(path, "wb") as f:
        f.write(header)
        for raw in raws.values():
            f.write(raw.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    at = len(header)
    for qt, raw in raws.items():
        view = mm[at:]  # longer than the tensor: only the first tensor_bytes are used
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = dequantize(view, qt, shape)
        assert torch.equal(got, dequantize(raw, qt, shape))
        # The result must be a fresh, writable tensor, not a window onto the read-only file.
        got.add_(1.0)
        at += raw.size


def test_f32_result_does_not_alias_input() -> None:
    data = torch.arange(8, dtype=torch.float32).view(torch.uint8)
    out = dequantize(data, QT.F32, (2, 4))
    out.zero_()
    assert data.view(torch.float32)[1] == 1.0


def test_bytes_and_short_input() -> None:
    raw = _as_flat_bytes(_raw(QT.Q4_0, (2, 64)))
    assert torch.equal(dequantize(raw.tobytes(), QT.Q4_0, (2, 64)), dequantize(raw, QT.Q4_0, (2, 64)))
    with pytest.raises(ValueError, match="needs 72 bytes"):
        dequantize(raw[:-1], QT.Q4_0, (2, 64))


def test_empty_tensor() -> None:
    assert dequantize(np.zeros(0, np.uint8), QT.Q4_K, (0, 256)).shape == (0, 256)


# --- the 4-bit split --------------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", sorted(Q4_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["quantized", "random"])
def test_q4_parts_reconstruct_dequantize(qt: QuantType, source: str) -> None:
    shape = (3, 2, 512)
    raw = _raw(qt, shape) if source == "quantized" and qt in QUANTIZABLE else _random_blocks(qt, shape, 2)
    data = _as_flat_bytes(raw)
    codes, scale, offset, group = q4_codes_scales_offsets(data, qt, shape)
    n, k = 6, 512
    assert group == (256 if qt in (QT.TQ1_0, QT.TQ2_0) else 32)
    assert codes.dtype == torch.uint8 and codes.shape == (n, k)
    assert scale.dtype == offset.dtype == torch.float32
    assert scale.shape == offset.shape == (n, k // group)
    assert int(codes.max()) <= 15
    if qt in (QT.TQ1_0, QT.TQ2_0) and source == "quantized":
        assert set(codes.unique().tolist()) <= {7, 8, 9}

    rebuilt = codes.to(torch.float32).view(n, k // group, group) * scale.unsqueeze(-1) + offset.unsqueeze(-1)
    full = dequantize(data, qt, shape)
    assert torch.equal(rebuilt.view(shape), full)
    _assert_close(full, _reference(raw, qt, shape))


# --- row lookup -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.F16, QT.TQ1_0], ids=lambda t: t.name)
def test_dequantize_rows(qt: QuantType) -> None:
    shape = (40, 512)
    raw = _raw(qt, shape) if qt in QUANTIZABLE else _random_blocks(qt, shape)
    data = torch.from_numpy(_as_flat_bytes(raw))
    full = dequantize(data, qt, shape)
    rows = torch.tensor([[3, 0, 39], [7, 7, 1]])
    got = dequantize_rows(data, qt, shape, rows)
    assert got.shape == (2, 3, 512)
    assert torch.equal(got, full[rows])
    assert dequantize_rows(data, qt, shape, torch.tensor(5)).shape == (512,)
    assert dequantize_rows(data, qt, shape, torch.zeros(0, dtype=torch.long)).shape == (0, 512)
    with pytest.raises(IndexError):
        dequantize_rows(data, qt, shape, torch.tensor([40]))
    with pytest.raises(IndexError):
        dequantize_rows(data, qt, shape, torch.tensor([-1]))
