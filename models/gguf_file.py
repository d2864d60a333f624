"""Strict GGUF v2/v3 reader: the only code that parses a model file's header, metadata and tensor table.

Everything else in ripelm gets a validated `GGUFFile` and reads tensor bytes through `tensor_bytes`, which
slices one read-only memory map of the file. Validation happens before any tensor data is touched: GGUF
parsers have had heap-overflow CVEs (CVE-2024-25664..25668) and `gguf.GGUFReader` surfaces numpy errors on
malformed input, so every count, length, type, shape and offset read from the file is checked here against
the file size before anything is allocated from it, and every failure is a `ModelFormatError` that says
what is wrong and where.

The byte-level reads (bounded counts, lengths and header size) live in `gguf_reader`; this module checks
the tensor table (types, shapes, alignment, bounds, overlap) and owns the records everyone else uses.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ripelm.models.errors import ModelFileChangedError, ModelFormatError, ModelNotFoundError
from ripelm.models.file_guard import FileState, changed_message
from ripelm.models.gguf_reader import (
    ABSURD_COUNT,
    DEFAULT_ALIGNMENT,
    HEADER_SIZE,
    MAX_ALIGNMENT,
    MAX_DIMS,
    MAX_KEY_LENGTH,
    MAX_TENSOR_NAME_LENGTH,
    MIN_KV_SIZE,
    MIN_TENSOR_INFO_SIZE,
    U32,
    GGUFValueType,
    HeaderReader,
    check_magic_and_version,
)
from ripelm.models.quant_types import BLOCK_LAYOUT

__all__ = [
    "GGML_TYPES",
    "GGMLTypeInfo",
    "GGUFFile",
    "GGUFValueType",
    "TensorInfo",
    "ggml_type_name",
    "open_gguf",
    "unsupported_tensor_types",
]


@dataclass(frozen=True, slots=True)
class GGMLTypeInfo:
    """Storage layout of a ggml tensor type: `type_size` bytes per block of `block_size` elements."""

    type_id: int
    name: str
    block_size: int
    type_size: int


# The size table is the gguf package's (through models.quant_types), so new quant types need no change here.
GGML_TYPES: dict[int, GGMLTypeInfo] = {
    int(t): GGMLTypeInfo(int(t), t.name, int(bs), int(ts)) for t, (bs, ts) in BLOCK_LAYOUT.items()
}


def ggml_type_name(type_id: int) -> str:
    info = GGML_TYPES.get(type_id)
    return info.name if info is not None else f"unknown({type_id})"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor table entry. `shape` is GGUF order (ne[0], the innermost/row length, first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(eq=False)
class GGUFFile:
    """A validated GGUF file: metadata, tensor table, and a read-only memory map for tensor data.

    Metadata values: ints/floats/bools/str for scalars (strings UTF-8 with invalid bytes replaced), python
    lists for arrays of strings, nested arrays and numeric arrays shorter than NUMPY_ARRAY_THRESHOLD, and
    read-only numpy arrays for longer numeric arrays. `metadata_types` gives each key's GGUF value type.
    """

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    metadata_types: dict[str, int]
    tensors: dict[str, TensorInfo]  # in file order
    _mm: np.ndarray | None = field(default=None, repr=False)
    state: FileState | None = None  # the opened file as validated (see models/file_guard.py)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def in_memory(self) -> bool:
        """The tensor bytes are a private copy (`load_into_memory`), not a map of the file."""
        return self._mm is not None and not isinstance(self._mm, np.memmap)

    def load_into_memory(self) -> None:
        """Replace the memory map by a private, read-only copy of the file, so that nothing read from
        `tensor_bytes` afterwards can fault if the file is truncated (see models/file_guard.py). Call it
        before taking any tensor's bytes. ModelFileChangedError if the file is no longer the one validated."""
        if self._mm is None:
            raise ValueError(f"{self.path} has been closed")
        if self.in_memory:
            return
        try:
            with open(self.path, "rb", buffering=0) as f:
                change = FileState.of(os.fstat(f.fileno())).change_since(self.state) if self.state else None
                if change is not None:
                    raise ModelFileChangedError(changed_message(self.path, change))
                data = np.empty(self.file_size, dtype=np.uint8)
                view = memoryview(data)
                done = 0
                while done < self.file_size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise ModelFileChangedError(
                            changed_message(
                                self.path, f"it ended at {done} of {self.file_size} bytes while read"
                            )
                        )
                    done += n
        except OSError as e:
            raise ModelFormatError(f"cannot read model file {self.path}: {e.strerror or e}") from None
        data.flags.writeable = False
        self._mm = data

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name`: a read-only uint8 view into the file's memory map, or into its
        private copy after `load_into_memory` (no copy either way)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        if self._mm is None:
            raise ValueError(f"{self.path} has been closed")
        return self._mm[info.offset : info.offset + info.nbytes]

    def close(self) -> None:
        # Views handed out by tensor_bytes keep the mapping alive on their own; this only drops ours.
        self._mm = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unsupported_tensor_types(g: GGUFFile, supported: Iterable[int]) -> list[tuple[str, str]]:
    """(tensor name, type name) for each tensor whose ggml type is not in `supported`, in file order."""
    ok = set(supported)
    return [(t.name, t.type_name) for t in g.tensors.values() if t.ggml_type not in ok]


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open, validate and index a GGUF file. Raises ModelNotFoundError / ModelFormatError."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file not found: {p}") from None
    except OSError as e:
        raise ModelFormatError(f"cannot access model file {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFormatError(f"{p} is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{p} is not a regular file")
    size = st.st_size
    if size == 0:
        raise ModelFormatError(f"{p}: not a GGUF file: the file is empty")
    try:
        with open(p, "rb") as f:
            opened = os.fstat(f.fileno())  # the file we actually opened, not whatever stat() saw
            size = opened.st_size
            head = f.read(8)
            try:
                check_magic_and_version(head, size)
            except ModelFormatError as e:
                raise ModelFormatError(f"{p}: {e}") from None
            mm = np.memmap(f, dtype=np.uint8, mode="r", shape=(size,))
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {p}: {e.strerror or e}") from None
    try:
        g = _parse(HeaderReader(mm, size, p), p)
        g.state = FileState.of(opened)
        return g
    except ModelFormatError as e:
        raise ModelFormatError(f"{p}: {e}") from None
    except (ValueError, OverflowError, struct.error, UnicodeError, IndexError, MemoryError) as e:
        # A check above missed something: still report it as a format error, never a crash.
        raise ModelFormatError(f"{p}: malformed GGUF file: {type(e).__name__}: {e}") from e


def _parse(r: HeaderReader, path: Path) -> GGUFFile:
    """Read the header, metadata and tensor table, and check every tensor entry against the file."""
    size = r.size
    r.fill(HEADER_SIZE, "header")
    version = U32(r.buf, 4)[0]
    r.pos = 8
    tensor_count = r.u64("tensor count")
    kv_count = r.u64("metadata count")
    body = size - HEADER_SIZE
    if tensor_count * MIN_TENSOR_INFO_SIZE > size and tensor_count >= ABSURD_COUNT:
        raise ModelFormatError(
            f"absurd tensor count {tensor_count}: a {size}-byte file can hold at most "
            f"{body // MIN_TENSOR_INFO_SIZE} tensor infos"
        )
    if kv_count * MIN_KV_SIZE > size and kv_count >= ABSURD_COUNT:
        raise ModelFormatError(
            f"absurd metadata count {kv_count}: a {size}-byte file can hold at most "
            f"{body // MIN_KV_SIZE} key/value pairs"
        )
    if tensor_count * MIN_TENSOR_INFO_SIZE + kv_count * MIN_KV_SIZE > body:
        raise ModelFormatError(
            f"truncated GGUF: {kv_count} key/value pairs and {tensor_count} tensor infos cannot fit "
            f"in a {size}-byte file"
        )

    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(kv_count):
        at = r.pos
        key = r.strict_str(f"metadata key #{i}", MAX_KEY_LENGTH)
        if key in metadata:
            raise ModelFormatError(f"duplicate metadata key '{key}' at offset {at}")
        vtype = r.u32(f"value type of '{key}'")
        metadata[key] = r.value(vtype, f"'{key}'", 0)
        types[key] = vtype

    alignment = _alignment(metadata, types)

    raw_tensors: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(tensor_count):
        at = r.pos
        name = r.strict_str(f"tensor name #{i}", MAX_TENSOR_NAME_LENGTH)
        if name in seen:
            raise ModelFormatError(f"duplicate tensor name '{name}' at offset {at}")
        seen.add(name)
        n_dims = r.u32(f"n_dims of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFormatError(f"tensor '{name}' has n_dims {n_dims} (must be 1..{MAX_DIMS})")
        shape = tuple(r.u64(f"dims of tensor '{name}'") for _ in range(n_dims))
        ggml_type = r.u32(f"type of tensor '{name}'")
        rel = r.u64(f"offset of tensor '{name}'")
        raw_tensors.append((name, shape, ggml_type, rel))

    data_offset = -(-r.pos // alignment) * alignment
    if tensor_count and data_offset > size:
        raise ModelFormatError(
            f"truncated GGUF: tensor data section would start at {data_offset}, past end of file "
            f"({size} bytes)"
        )

    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel in raw_tensors:
        info = GGML_TYPES.get(ggml_type)
        if info is None:
            raise ModelFormatError(f"tensor '{name}' has unknown ggml type {ggml_type}")
        if any(d < 1 for d in shape):
            raise ModelFormatError(f"tensor '{name}' has a zero dimension: shape {list(shape)}")
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements >= 1 << 62:
            raise ModelFormatError(f"tensor '{name}' has an absurd shape {list(shape)}")
        if shape[0] % info.block_size:
            raise ModelFormatError(
                f"tensor '{name}' row length {shape[0]} is not a multiple of the {info.name} block "
                f"size {info.block_size}"
            )
        if rel % alignment:
            raise ModelFormatError(
                f"tensor '{name}' offset {rel} is not a multiple of the alignment {alignment}"
            )
        nbytes = n_elements // info.block_size * info.type_size
        start = data_offset + rel
        if start + nbytes > size:
            raise ModelFormatError(
                f"tensor '{name}' data [{start}, {start + nbytes}) lies outside the file ({size} bytes)"
            )
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)

    by_offset = sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes))
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if b.offset < a.offset + a.nbytes:
            raise ModelFormatError(
                f"tensors '{a.name}' [{a.offset}, {a.offset + a.nbytes}) and '{b.name}' "
                f"[{b.offset}, {b.offset + b.nbytes}) overlap"
            )

    return GGUFFile(
        path=path,
        version=version,
        file_size=size,
        alignment=alignment,
        data_offset=data_offset,
        metadata=metadata,
        metadata_types=types,
        tensors=tensors,
        _mm=r.mm,
    )


def _alignment(metadata: dict[str, Any], types: dict[str, int]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if types["general.alignment"] != GGUFValueType.UINT32:
        raise ModelFormatError(
            f"general.alignment must be a uint32, got value type {types['general.alignment']}"
        )
    if value < 1 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise ModelFormatError(
            f"general.alignment {value} is invalid (must be a power of two up to {MAX_ALIGNMENT})"
        )
    return value
