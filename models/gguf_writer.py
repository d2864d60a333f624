"""Write a GGUF file derived from a validated one: metadata copied byte for byte, a new tensor table and data.

`ripe quantize` changes tensor types but must keep every metadata value exactly as the source stores it
(tokenizer arrays, their element types, strings that are not valid UTF-8). So the source's key/value
section is split into raw entries, copied unchanged except for the keys being replaced, and the tensors
are streamed out one at a time after a header whose offsets are computed up front from each tensor's type
and shape. The file is written under a temporary name and moved into place only when complete.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ripelm.kernels.quant_types import tensor_bytes
from ripelm.models.gguf_file import GGUFFile

_STRING, _ARRAY, _UINT32 = 8, 9, 4
# value type -> byte size of the scalar types (uint8, int8, uint16, int16, uint32, int32, float32, bool,
# -, -, uint64, int64, float64)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass(frozen=True)
class RawEntry:
    """One metadata key/value exactly as stored: the key and the entry's bytes (key, type and value)."""

    key: str
    data: bytes


@dataclass
class TensorOut:
    """A tensor of the output file; `produce` returns its bytes (called once, in file order)."""

    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] (the row length) first
    ggml_type: int
    produce: Callable[[], np.ndarray | bytes]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.ggml_type, tuple(reversed(self.shape)))


def raw_metadata(g: GGUFFile) -> list[RawEntry]:
    """The source file's key/value entries as raw bytes, in file order.

    `g` has passed `open_gguf`'s checks, so every length here is known to lie inside the file.
    """
    with open(g.path, "rb") as f:
        head = f.read(g.data_offset)
    (n_kv,) = struct.unpack_from("<Q", head, 16)
    pos = 24
    out: list[RawEntry] = []
    for _ in range(n_kv):
        start = pos
        (klen,) = struct.unpack_from("<Q", head, pos)
        key = head[pos + 8 : pos + 8 + klen].decode("utf-8")
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", head, pos)
        pos = _skip_value(head, pos + 4, vtype)
        out.append(RawEntry(key, head[start:pos]))
    return out


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[vtype]
    if vtype == _STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR_SIZES:
            return pos + count * _SCALAR_SIZES[etype]
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def uint32_entry(key: str, value: int) -> RawEntry:
    return RawEntry(key, _string(key) + struct.pack("<II", _UINT32, value))


def replace_entries(entries: Sequence[RawEntry], new: Iterable[RawEntry]) -> list[RawEntry]:
    """`entries` with each of `new` replacing the entry of the same key in place, or appended."""
    out = list(entries)
    index = {e.key: i for i, e in enumerate(out)}
    for e in new:
        if e.key in index:
            out[index[e.key]] = e
        else:
            index[e.key] = len(out)
            out.append(e)
    return out


def write_gguf(
    path: Path,
    entries: Sequence[RawEntry],
    tensors: Sequence[TensorOut],
    *,
    alignment: int,
    version: int = 3,
    on_tensor: Callable[[int, TensorOut], None] | None = None,
) -> None:
    """Write the file; `on_tensor(i, t)` is called after each tensor's data is written (progress)."""
    pad = lambda n: -n % alignment  # noqa: E731
    infos = bytearray()
    offset = 0
    for t in tensors:
        infos += _string(t.name) + struct.pack("<I", len(t.shape))
        infos += struct.pack(f"<{len(t.shape)}Q", *t.shape)
        infos += struct.pack("<IQ", t.ggml_type, offset)
        offset += t.nbytes + pad(t.nbytes)
    head = struct.pack("<4sIQQ", b"GGUF", version, len(tensors), len(entries))
    head += b"".join(e.data for e in entries) + bytes(infos)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # concurrent writers never share it
    try:
        with open(partial, "wb") as f:
            f.write(head + bytes(pad(len(head))))
            for i, t in enumerate(tensors):
                data = t.produce()
                raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
                if len(raw) != t.nbytes:
                    raise ValueError(f"tensor {t.name}: produced {len(raw)} bytes, expected {t.nbytes}")
                f.write(raw)
                f.write(bytes(pad(len(raw))))
                if on_tensor is not None:
                    on_tensor(i, t)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
