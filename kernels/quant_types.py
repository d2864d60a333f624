"""GGML tensor types: their numeric ids and block layouts, and the byte-size arithmetic built on them.

This module owns the mapping from GGML's type ids to (elements per block, bytes per block). It knows nothing
about the GGUF container; the ids and sizes match ggml's `ggml_type` / `type_traits` tables.
"""

from collections.abc import Sequence
from enum import IntEnum
from math import prod


class QuantType(IntEnum):
    """GGML tensor types by their on-disk numeric id.

    Ids 4, 5 and 31-33, 36-38 belonged to formats ggml has since removed; they are deliberately absent so that
    a file using them is reported as unknown rather than misread.
    """

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements per block, bytes per block). A row's length must be a whole number of blocks.
BLOCK_LAYOUT: dict[QuantType, tuple[int, int]] = {
    QuantType.F32: (1, 4),
    QuantType.F16: (1, 2),
    QuantType.Q4_0: (32, 18),
    QuantType.Q4_1: (32, 20),
    QuantType.Q5_0: (32, 22),
    QuantType.Q5_1: (32, 24),
    QuantType.Q8_0: (32, 34),
    QuantType.Q8_1: (32, 40),
    QuantType.Q2_K: (256, 84),
    QuantType.Q3_K: (256, 110),
    QuantType.Q4_K: (256, 144),
    QuantType.Q5_K: (256, 176),
    QuantType.Q6_K: (256, 210),
    QuantType.Q8_K: (256, 292),
    QuantType.IQ2_XXS: (256, 66),
    QuantType.IQ2_XS: (256, 74),
    QuantType.IQ3_XXS: (256, 98),
    QuantType.IQ1_S: (256, 50),
    QuantType.IQ4_NL: (32, 18),
    QuantType.IQ3_S: (256, 110),
    QuantType.IQ2_S: (256, 82),
    QuantType.IQ4_XS: (256, 136),
    QuantType.I8: (1, 1),
    QuantType.I16: (1, 2),
    QuantType.I32: (1, 4),
    QuantType.I64: (1, 8),
    QuantType.F64: (1, 8),
    QuantType.IQ1_M: (256, 56),
    QuantType.BF16: (1, 2),
    QuantType.TQ1_0: (256, 54),
    QuantType.TQ2_0: (256, 66),
    QuantType.MXFP4: (32, 17),
    QuantType.NVFP4: (64, 36),
    QuantType.Q1_0: (128, 18),
}


def quant_type(qtype: int) -> QuantType:
    """The QuantType for a raw GGML type id, or ValueError naming the id if it is not one we know."""
    if isinstance(qtype, QuantType):
        return qtype
    try:
        return QuantType(int(qtype))
    except ValueError:
        raise ValueError(
            f"unknown GGML tensor type id {int(qtype)} (not a type this runtime recognises; "
            "the file may come from a newer or older ggml)"
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
