"""The GGML tensor types the kernels compute with (dequantize), and their byte-size arithmetic.

The kernels import only torch and numpy, so they hold the ids and block layouts of these types themselves;
every other type, and the table for reading files, is the gguf package's (`ripelm.models.quant_types`).
tests/test_dequant.py checks these against gguf's table.
"""

from collections.abc import Sequence
from enum import IntEnum
from math import prod

__all__ = ["BLOCK_LAYOUT", "QuantType", "block_layout", "quant_type", "row_bytes", "tensor_bytes"]


class QuantType(IntEnum):
    """The types the kernels dequantize, by their GGML id."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35


# (elements per block, bytes per block). A row's length must be a whole number of blocks.
BLOCK_LAYOUT: dict[QuantType, tuple[int, int]] = {
    QuantType.F32: (1, 4),
    QuantType.F16: (1, 2),
    QuantType.Q4_0: (32, 18),
    QuantType.Q4_1: (32, 20),
    QuantType.Q5_0: (32, 22),
    QuantType.Q5_1: (32, 24),
    QuantType.Q8_0: (32, 34),
    QuantType.Q2_K: (256, 84),
    QuantType.Q3_K: (256, 110),
    QuantType.Q4_K: (256, 144),
    QuantType.Q5_K: (256, 176),
    QuantType.Q6_K: (256, 210),
    QuantType.BF16: (1, 2),
    QuantType.TQ1_0: (256, 54),
    QuantType.TQ2_0: (256, 66),
}


def quant_type(qtype: int) -> QuantType:
    """The QuantType for a GGML type id, or ValueError naming it if the kernels do not compute with it."""
    if isinstance(qtype, QuantType):
        return qtype
    try:
        return QuantType(int(qtype))
    except ValueError:
        name = getattr(qtype, "name", None)  # a member of gguf's (or another) enum of all the types
        if name is not None:
            msg = f"tensor type {name} (id {int(qtype)}) is not one the kernels compute with"
            raise ValueError(msg) from None
        raise ValueError(
            f"unknown GGML tensor type id {int(qtype)} (not a type the kernels compute with; the file may "
            "come from a newer or older ggml)"
        ) from None


def block_layout(qtype: int) -> tuple[int, int]:
    """(elements per block, bytes per block) for a type id."""
    return BLOCK_LAYOUT[quant_type(qtype)]


def row_bytes(qtype: int, n_cols: int) -> int:
    """Bytes one row of `n_cols` elements takes; ValueError if the row is not a whole number of blocks."""
    qt = quant_type(qtype)
    block_size, type_size = BLOCK_LAYOUT[qt]
    if n_cols < 0 or n_cols % block_size != 0:
        raise ValueError(f"row length {n_cols} is not a multiple of the {qt.name} block size {block_size}")
    return n_cols // block_size * type_size


def tensor_bytes(qtype: int, shape: Sequence[int]) -> int:
    """Bytes a row-major tensor of `shape` (last dim = row length) takes in type `qtype`."""
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"negative dimension in tensor shape {tuple(shape)}")
    # A 0-d tensor is a single element, i.e. one row of length 1.
    n_cols = int(shape[-1]) if len(shape) else 1
    n_rows = prod(int(d) for d in shape[:-1])
    return n_rows * row_bytes(qtype, n_cols)
