"""Writing GGUF files with `gguf.GGUFWriter`: metadata copied exactly from a source file, tensors streamed.

`ripe quantize` and the synthetic bench models write through gguf-py's writer (the library llama.cpp's own
converters use). Two things it leaves to its caller are done here:

* exact copies of a source file's metadata: `source_fields` reads every key/value with `gguf.GGUFReader`
  and keeps strings as bytes (so strings that are not valid UTF-8 survive) and each value's stored type
  (scalars and array element types), ready for `GGUFWriter.add_key_value`;
* streaming: each tensor's bytes are produced only when written (`TensorOut.produce`), one at a time,
  into a temporary file moved into place only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ripelm.kernels.quant_types import tensor_bytes
from ripelm.models.errors import UnsupportedModelError

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


def _field(f: gguf.ReaderField) -> Field:
    vtype = f.types[0]
    if vtype == VT.STRING:
        return Field(f.name, f.parts[-1].tobytes(), vtype)
    if vtype != VT.ARRAY:
        return Field(f.name, f.parts[-1].item(), vtype)
    if len(f.types) != 2:  # GGUFReader flattens nested arrays, and GGUFWriter refuses empty ones
        raise UnsupportedModelError(f"metadata {f.name}: empty or nested arrays cannot be copied")
    sub = f.types[1]
    if sub == VT.STRING:
        return Field(f.name, [f.parts[i].tobytes() for i in f.data], vtype, sub)
    return Field(f.name, [f.parts[i].item() for i in f.data], vtype, sub)


def source_fields(path: str | Path, prefix: str = "") -> list[Field]:
    """The key/values of the GGUF file at `path` (those whose key starts with `prefix`), in file order.

    The file has passed `open_gguf`'s checks before this reads it."""
    reader = gguf.GGUFReader(path)
    return [
        _field(f)
        for f in reader.fields.values()
        if not f.name.startswith("GGUF.") and f.name.startswith(prefix)  # GGUF.*: the reader's header
    ]


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
