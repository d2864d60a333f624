"""Every GGML tensor type and the byte-size arithmetic of reading and writing GGUF files.

The type ids and block layouts are the `gguf` package's (`GGMLQuantizationType`, `GGML_QUANT_SIZES`), the
single source for them above the kernels (which import only torch and numpy, and keep the layouts of the
types they compute with in `ripelm.kernels.quant_types`, checked against these by tests/test_dequant.py).
Ids ggml has removed (4, 5, 31-33, 36-38) are absent from gguf-py's table, so a file using them is
reported as unknown rather than misread.
"""

from collections.abc import Sequence
from math import prod

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QuantType

__all__ = ["BLOCK_LAYOUT", "QuantType", "block_layout", "quant_type", "row_bytes", "tensor_bytes"]

# (elements per block, bytes per block). A row's length must be a whole number of blocks.
BLOCK_LAYOUT: dict[QuantType, tuple[int, int]] = dict(GGML_QUANT_SIZES)


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
