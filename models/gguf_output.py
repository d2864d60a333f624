"""Writing GGUF files with `gguf.GGUFWriter`: metadata copied exactly from a source file, tensors streamed.

`ripe quantize` and the synthetic bench models write through gguf-py's writer (the library llama.cpp's own
converters use). Two things it leaves to its caller are done here:

* exact copies of a source file's metadata: `source_fields` reads every key/value keeping strings as bytes
  (so strings that are not valid UTF-8 survive) and each value's stored type (scalars and array element
  types), ready for `GGUFWriter.add_key_value`. It parses the header itself rather than through
  `gguf.GGUFReader`: the reader builds a numpy view per array element, which takes ~3 s for the bundled
  tokenizer's 49k tokens and 48k merges (against ~0.1 s here) on every `ripe quantize` and synthetic
  model. The file has passed `open_gguf`'s bounds checks first, so this walk needs none of its own;
  tests/test_quantize.py checks its copies byte for byte against GGUFReader's view of the files;
* streaming: each tensor's bytes are produced only when written (`TensorOut.produce`), one at a time,
  into a temporary file moved into place only when complete.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ripelm.models.errors import UnsupportedModelError
from ripelm.models.gguf_file import open_gguf
from ripelm.models.quant_types import tensor_bytes

VT = gguf.GGUFValueType
ARCH_KEY = "general.architecture"


@dataclass(frozen=True)
class Field:
    """One metadata key/value as `GGUFWriter.add_key_value` takes it (strings may be bytes)."""

    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


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


_SCALARS = {
    VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
    VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d",
}  # fmt: skip


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n], pos + 8 + n


def _value(buf: bytes, pos: int, vtype: int, key: str) -> tuple[Any, VT | None, int]:
    """(value, array element type, position after it) of the value at `pos`."""
    if vtype in _SCALARS:
        fmt = "<" + _SCALARS[VT(vtype)]
        return struct.unpack_from(fmt, buf, pos)[0], None, pos + struct.calcsize(fmt)
    if vtype == VT.STRING:
        s, pos = _string(buf, pos)
        return s, None, pos
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype == VT.ARRAY or count == 0:  # GGUFWriter writes neither nested nor empty arrays
        raise UnsupportedModelError(f"metadata {key}: empty or nested arrays cannot be copied")
    if etype == VT.STRING:
        items = []
        for _ in range(count):
            s, pos = _string(buf, pos)
            items.append(s)
        return items, VT.STRING, pos
    fmt = "<" + _SCALARS[VT(etype)]
    n = count * struct.calcsize(fmt)
    return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)), VT(etype), pos + n


def source_fields(path: str | Path, prefix: str = "") -> list[Field]:
    """The key/values of the GGUF file at `path` (those whose key starts with `prefix`), in file order.

    The file must have passed `open_gguf`'s checks: lengths and types are trusted here."""
    g = open_gguf(path)
    g.close()
    with open(path, "rb") as f:
        buf = f.read(g.data_offset)
    (n_kv,) = struct.unpack_from("<Q", buf, 16)
    pos, out = 24, []
    for _ in range(n_kv):
        key_bytes, pos = _string(buf, pos)
        key = key_bytes.decode("utf-8")
        (vtype,) = struct.unpack_from("<I", buf, pos)
        value, sub, pos = _value(buf, pos + 4, vtype, key)
        if key.startswith(prefix):
            out.append(Field(key, value, VT(vtype), sub))
    return out


def replace_fields(fields: Sequence[Field], new: Iterable[Field]) -> list[Field]:
    """`fields` with each of `new` replacing the field of the same key in place, or appended."""
    out = list(fields)
    index = {f.key: i for i, f in enumerate(out)}
    for f in new:
        if f.key in index:
            out[index[f.key]] = f
        else:
            index[f.key] = len(out)
            out.append(f)
    return out


def write_gguf(
    path: Path,
    fields: Sequence[Field],
    tensors: Sequence[TensorOut],
    *,
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT,
    on_tensor: Callable[[int, TensorOut], None] | None = None,
) -> None:
    """Write the file; `fields` must include general.architecture. `on_tensor(i, t)` is called after each
    tensor's data is written (progress)."""
    arch = next((f.value for f in fields if f.key == ARCH_KEY), None)
    if arch is None:
        raise ValueError(f"no {ARCH_KEY} among the metadata")
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # concurrent writers never share it
    # the writer sets general.architecture itself, first, as llama.cpp's converters write it
    w = gguf.GGUFWriter(partial, arch.decode() if isinstance(arch, bytes) else arch)
    w.data_alignment = alignment
    for f in fields:
        if f.key != ARCH_KEY:
            w.add_key_value(f.key, f.value, f.vtype, f.sub_type)
    for t in tensors:
        # not uint8: the shape is the element shape, not a byte shape
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes, qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            data = t.produce()
            raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
            raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
            if raw.nbytes != t.nbytes:
                raise ValueError(f"tensor {t.name}: produced {raw.nbytes} bytes, expected {t.nbytes}")
            w.write_tensor_data(raw)
            if on_tensor is not None:
                on_tensor(i, t)
        w.close()
        os.replace(partial, path)
    finally:
        w.close()
        partial.unlink(missing_ok=True)
