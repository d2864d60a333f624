"""Vectorised torch dequantisation of raw GGML blocks, and the code/scale/offset split of 4-bit weights.

This module owns the bit layouts of the GGML block formats (as written by ggml-quants.c). It takes raw block
bytes and a shape and knows nothing about the GGUF container. Every dequantiser works on all blocks at once
(no Python loop over blocks) in float32 and runs on whatever device the input bytes live on.
"""

import warnings
from collections.abc import Callable, Sequence
from math import prod
from typing import NamedTuple

import numpy as np
import torch

from .quant_types import BLOCK_LAYOUT, QuantType, quant_type, row_bytes, tensor_bytes

__all__ = [
    "DEQUANT_TYPES",
    "Q4_TYPES",
    "Q4Parts",
    "dequantize",
    "dequantize_rows",
    "q4_codes_scales_offsets",
]

ByteSource = torch.Tensor | np.ndarray | bytes | bytearray | memoryview
_Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Q4Parts(NamedTuple):
    """A 4-bit weight split so that, in float32, w == scale * code + offset exactly (group-wise)."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K // group_size]
    offset: torch.Tensor  # float32 [N, K // group_size]
    group_size: int


def _as_bytes(data: ByteSource, nbytes: int) -> torch.Tensor:
    """The first `nbytes` bytes of `data` as a 1-D uint8 tensor, without copying when avoidable."""
    if isinstance(data, bytes | bytearray | memoryview):
        data = np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, np.ndarray):
        arr = data.reshape(-1)
        if arr.dtype != np.uint8:
            arr = arr.view(np.uint8)
        if arr.size < nbytes:
            raise ValueError(f"tensor needs {nbytes} bytes but only {arr.size} were given")
        arr = arr[:nbytes]
        if arr.flags.writeable:
            return torch.from_numpy(arr)
        # A read-only memmap is safe to wrap: nothing here writes to its input and every result is a fresh
        # tensor, so torch's not-writable warning does not apply and copying the bytes would only cost time.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    if isinstance(data, torch.Tensor):
        t = data.reshape(-1)
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        if t.numel() < nbytes:
            raise ValueError(f"tensor needs {nbytes} bytes but only {t.numel()} were given")
        return t[:nbytes]
    raise TypeError(f"expected a uint8 torch tensor, numpy array or bytes, got {type(data).__name__}")


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block, as float32 [n_blocks, 1]."""
    # The column slice is strided; making the 2 bytes contiguous is what lets them be reinterpreted as fp16.
    return blocks[:, at : at + 2].contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(-1, 1)


def _nibbles(x: torch.Tensor) -> torch.Tensor:
    """[..., L] bytes -> [..., 2, L]: all low nibbles, then all high nibbles (ggml's packing order)."""
    return torch.stack((x & 0x0F, x >> 4), dim=-2)


def _crumbs(x: torch.Tensor) -> torch.Tensor:
    """[..., L] bytes -> [..., 4, L] 2-bit fields, lowest bits first."""
    return (x.unsqueeze(-2) >> _shifts((0, 2, 4, 6), x.device)) & 0x03


def _bits(x: torch.Tensor) -> torch.Tensor:
    """[..., L] bytes -> [..., 8, L] single bits, lowest bit first."""
    return (x.unsqueeze(-2) >> _shifts(range(8), x.device)) & 0x01


# ---------------------------------------------------------------------------------------------------------
# 4-bit affine formats, all expressed as codes 0..15 with a per-group scale and offset. Their dequantisers go
# through the same split, so dequantize() and q4_codes_scales_offsets() can never disagree. Each returns
# codes [n, G, group] uint8 and scale, offset [n, G] float32 for G groups per block.
# Exactness: scale * code is exact in float32 (an fp16 mantissa times at most 6+4 bits), so the single
# rounding of "+ offset" is the same rounding ggml's own formula d*(q-8), d*q+m, d*sc*q - dmin*m does.


def _parts_q4_0(b: torch.Tensor) -> _Parts:
    d = _f16(b, 0)
    codes = _nibbles(b[:, 2:18]).reshape(-1, 1, 32)
    return codes, d, d * -8.0


def _parts_q4_1(b: torch.Tensor) -> _Parts:
    codes = _nibbles(b[:, 4:20]).reshape(-1, 1, 32)
    return codes, _f16(b, 0), _f16(b, 2)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K field into eight 6-bit scales and eight 6-bit mins per block."""
    # Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales/mins 4-7 are split between the nibbles of
    # bytes 8-11 (low 4 bits) and the top 2 bits of bytes 0-3 / 4-7.
    lo_s, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo_s & 0x3F, (hi & 0x0F) | ((lo_s >> 2) & 0x30)), dim=-1)
    mn = torch.cat((lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _parts_q4_k(b: torch.Tensor) -> _Parts:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    codes = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return codes, d * sc.to(torch.float32), -(dmin * mn.to(torch.float32))


def _tq_parts(t1: torch.Tensor, d: torch.Tensor) -> _Parts:
    """Ternary codes stored as t+1 in 0..2 (3 possible as garbage) -> code t+8 with scale d, offset -8d."""
    return (t1 + 7).reshape(-1, 1, 256), d, d * -8.0


def _parts_tq2_0(b: torch.Tensor) -> _Parts:
    return _tq_parts(_crumbs(b[:, 0:64].reshape(-1, 2, 32)), _f16(b, 64))


def _parts_tq1_0(b: torch.Tensor) -> _Parts:
    # Five (or four) base-3 digits per byte, stored as ceil(v * 256 / 243). Multiplying by 3^k (mod 256, so
    # uint8 wrap-around is intended) moves digit k to the top, and (x * 3) >> 8 reads it off.
    pow5 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8, device=b.device).view(-1, 1)
    n = b.shape[0]
    q0 = (b[:, 0:32].unsqueeze(1) * pow5).reshape(n, 160)
    q1 = (b[:, 32:48].unsqueeze(1) * pow5).reshape(n, 80)
    qh = (b[:, 48:52].unsqueeze(1) * pow5[:4]).reshape(n, 16)
    x = torch.cat((q0, q1, qh), dim=-1).to(torch.int16)
    t1 = ((x * 3) >> 8).to(torch.uint8)
    return _tq_parts(t1, _f16(b, 52))


_Q4_PARTS: dict[QuantType, tuple[Callable[[torch.Tensor], _Parts], int]] = {
    QuantType.Q4_0: (_parts_q4_0, 32),
    QuantType.Q4_1: (_parts_q4_1, 32),
    QuantType.Q4_K: (_parts_q4_k, 32),
    QuantType.TQ1_0: (_parts_tq1_0, 256),
    QuantType.TQ2_0: (_parts_tq2_0, 256),
}


def _affine(parts: Callable[[torch.Tensor], _Parts]) -> Callable[[torch.Tensor], torch.Tensor]:
    def dequant(b: torch.Tensor) -> torch.Tensor:
        codes, scale, offset = parts(b)
        return codes.to(torch.float32).mul_(scale.unsqueeze(-1)).add_(offset.unsqueeze(-1))

    return dequant


# ---------------------------------------------------------------------------------------------------------
# The other formats. Each takes blocks [n_blocks, type_size] uint8 and returns float32 holding n_blocks *
# block_size values in element order; the operation order follows ggml so roundings match it.


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].view(torch.int8).to(torch.float32).mul_(_f16(b, 0))


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian u32 whose bit i is the fifth bit of element i, i.e. bit i%8 of byte i//8.
    high = _bits(qh).transpose(-1, -2).reshape(-1, 32)
    return _nibbles(qs).reshape(-1, 32) | (high << 4)


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    return _q5_codes(b[:, 2:6], b[:, 6:22]).to(torch.float32).sub_(16.0).mul_(_f16(b, 0))


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    return _q5_codes(b[:, 4:8], b[:, 8:24]).to(torch.float32).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _deq_q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[:, 0:16]
    dl = _f16(b, 80) * (sc & 0x0F).to(torch.float32)
    ml = _f16(b, 82) * (sc >> 4).to(torch.float32)
    q = _crumbs(b[:, 16:80].reshape(-1, 2, 32)).reshape(-1, 16, 16).to(torch.float32)
    return q.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1))


def _deq_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    s = b[:, 96:108]
    # 16 signed 6-bit scales: low nibbles from bytes 0-7 (low nibbles first), top 2 bits from bytes 8-11.
    lo = _nibbles(s[:, 0:8]).reshape(n, 16)
    hi = _crumbs(s[:, 8:12]).reshape(n, 16)
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = _f16(b, 108) * sc
    low2 = _crumbs(b[:, 32:96].reshape(n, 2, 32)).reshape(n, 16, 16).to(torch.int8)
    # A clear hmask bit means "subtract 4"; a set bit means no offset.
    hbit = _bits(b[:, 0:32]).reshape(n, 16, 16).to(torch.int8)
    q = (low2 - ((1 - hbit) << 2)).to(torch.float32)
    return q.mul_(dl.unsqueeze(-1))


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    low = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = _bits(b[:, 16:48])
    q = (low | (high << 4)).to(torch.float32)
    return q.mul_((d * sc.to(torch.float32)).unsqueeze(-1)).sub_((dmin * mn.to(torch.float32)).unsqueeze(-1))


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _crumbs(b[:, 128:192].reshape(n, 2, 32)).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    scale = _f16(b, 208) * b[:, 192:208].view(torch.int8).to(torch.float32)
    return q.mul_(scale.unsqueeze(-1))


def _reinterpret(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = b.reshape(-1)
    # torch can only reinterpret bytes that start on an element boundary of the wider type.
    if flat.storage_offset() % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype)


def _deq_f32(b: torch.Tensor) -> torch.Tensor:
    # Cloned so the result never aliases the caller's (possibly read-only, memory-mapped) bytes.
    return _reinterpret(b, torch.float32).clone()


def _deq_f16(b: torch.Tensor) -> torch.Tensor:
    return _reinterpret(b, torch.float16).to(torch.float32)


def _deq_bf16(b: torch.Tensor) -> torch.Tensor:
    return _reinterpret(b, torch.bfloat16).to(torch.float32)


_DEQUANT: dict[QuantType, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantType.F32: _deq_f32,
    QuantType.F16: _deq_f16,
    QuantType.BF16: _deq_bf16,
    QuantType.Q8_0: _deq_q8_0,
    QuantType.Q5_0: _deq_q5_0,
    QuantType.Q5_1: _deq_q5_1,
    QuantType.Q2_K: _deq_q2_k,
    QuantType.Q3_K: _deq_q3_k,
    QuantType.Q5_K: _deq_q5_k,
    QuantType.Q6_K: _deq_q6_k,
    **{qt: _affine(fn) for qt, (fn, _) in _Q4_PARTS.items()},
}

DEQUANT_TYPES: frozenset[QuantType] = frozenset(_DEQUANT)
"""Types dequantize() and dequantize_rows() accept."""

Q4_TYPES: frozenset[QuantType] = frozenset(_Q4_PARTS)
"""Types q4_codes_scales_offsets() accepts."""


def _checked_type(qtype: int, table: dict[QuantType, object], what: str) -> QuantType:
    qt = quant_type(qtype)
    if qt not in table:
        names = ", ".join(sorted(t.name for t in table))
        raise ValueError(f"{what} does not support tensor type {qt.name} (supported: {names})")
    return qt


def _blocks(data: ByteSource, qt: QuantType, shape: Sequence[int]) -> torch.Tensor:
    _, type_size = BLOCK_LAYOUT[qt]
    return _as_bytes(data, tensor_bytes(qt, shape)).view(-1, type_size)


def _dequant_blocks(blocks: torch.Tensor, qt: QuantType, shape: Sequence[int]) -> torch.Tensor:
    return _DEQUANT[qt](blocks).reshape(tuple(int(d) for d in shape))


def dequantize(data: ByteSource, qtype: int, shape: Sequence[int]) -> torch.Tensor:
    """Decode raw GGML blocks into a fresh float32 tensor of `shape` (row-major, last dim = row length).

    `data` is a uint8 torch tensor, numpy array (a read-only memmap is fine and is not copied) or bytes; its
    first tensor_bytes(qtype, shape) bytes are used. The result is on the same device as `data`.
    """
    qt = _checked_type(qtype, _DEQUANT, "dequantize")
    return _dequant_blocks(_blocks(data, qt, shape), qt, shape)


def dequantize_rows(data: ByteSource, qtype: int, shape: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """Decode only the rows `rows` (an integer tensor of any shape) of the tensor `shape`.

    Rows index the flattened leading dimensions. Returns float32 [*rows.shape, shape[-1]]; only the selected
    rows' bytes are read and decoded, which is what makes embedding lookups in a quantised table cheap.
    """
    qt = _checked_type(qtype, _DEQUANT, "dequantize_rows")
    n_cols = int(shape[-1])
    n_rows = prod(int(d) for d in shape[:-1])
    rb = row_bytes(qt, n_cols)
    table = _as_bytes(data, n_rows * rb).view(n_rows, rb)
    idx = rows.reshape(-1).to(device=table.device, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
        raise IndexError(f"row index out of range for a table of {n_rows} rows")
    picked = table.index_select(0, idx)
    out = _dequant_blocks(picked.view(-1, BLOCK_LAYOUT[qt][1]), qt, (idx.numel(), n_cols))
    return out.reshape(*rows.shape, n_cols)


def q4_codes_scales_offsets(data: ByteSource, qtype: int, shape: Sequence[int]) -> Q4Parts:
    """Split a 4-bit tensor into codes uint8 [N, K] (0..15) and per-group float32 scale/offset [N, K // g].

    N is the product of the leading dims and K = shape[-1]; w == scale * code + offset holds exactly in
    float32 for every weight. Groups: Q4_0/Q4_1 blocks and Q4_K sub-blocks are 32 wide; TQ1_0/TQ2_0 blocks
    are 256 wide with code = ternary value + 8, scale = d, offset = -8 d. ValueError for other types.
    """
    qt = _checked_type(qtype, _Q4_PARTS, "q4_codes_scales_offsets")
    parts, group = _Q4_PARTS[qt]
    n_cols = int(shape[-1]) if len(shape) else 1
    n_rows = prod(int(d) for d in shape[:-1])
    codes, scale, offset = parts(_blocks(data, qt, shape))
    return Q4Parts(
        codes.reshape(n_rows, n_cols),
        scale.reshape(n_rows, n_cols // group),
        offset.reshape(n_rows, n_cols // group),
        group,
    )


def q8_0_as_two_q4(data: ByteSource, shape: Sequence[int]) -> tuple[Q4Parts, Q4Parts]:
    """Split a Q8_0 tensor into a high and a low 4-bit half whose sum is the exact weight.

    Each int8 code q = 16 * hi + lo with hi = q >> 4 in -8..7 and lo = q & 15 in 0..15, so with block scale
    d: w = d * q = (16 d) * (hi + 8) - 128 d  +  d * lo. Both halves have the Q4 form scale * code + offset
    at group 32, which lets Q8_0 weights run exactly on the int4 matmul (over 2K input columns).
    """
    qt = QuantType.Q8_0
    n_cols = int(shape[-1])
    n_rows = prod(int(d) for d in shape[:-1])
    b = _blocks(data, qt, shape)
    d = _f16(b, 0)  # [n_blocks, 1]
    q = b[:, 2:34].view(torch.int8)
    hi = ((q >> 4) + 8).to(torch.uint8).reshape(n_rows, n_cols)
    lo = (q & 15).to(torch.uint8).reshape(n_rows, n_cols)
    groups = (n_rows, n_cols // 32)
    high = Q4Parts(hi, (d * 16.0).reshape(groups), (d * -128.0).reshape(groups), 32)
    low = Q4Parts(lo, d.reshape(groups), torch.zeros(groups), 32)
    return high, low
