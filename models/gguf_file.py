"""Strict GGUF v2/v3 reader: the only code that parses a model file's header, metadata and tensor table.

Everything else in ripelm gets a validated `GGUFFile` and reads tensor bytes through `tensor_bytes`, which
slices one read-only memory map of the file. Validation happens before any tensor data is touched: GGUF
parsers have had heap-overflow CVEs (CVE-2024-25664..25668) and `gguf.GGUFReader` surfaces numpy errors on
malformed input, so every count, length, type, shape and offset read from the file is checked here against
the file size before anything is allocated from it, and every failure is a `ModelFormatError` that says
what is wrong and where.

Memory and time are bounded: a count is only used after checking that the bytes left in the file could
hold that many items of the smallest possible encoding, and strings and the whole header region are capped
(MAX_STRING_LENGTH, MAX_HEADER_BYTES) so a corrupt length in a huge file cannot pull gigabytes into memory.
Only little-endian files are read; big-endian ones are rejected by name.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ripelm.models.errors import ModelFormatError, ModelNotFoundError

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

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_SIZE = 24  # magic u32, version u32, tensor_count u64, kv_count u64
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
MAX_KEY_LENGTH = 65535  # the GGUF spec's limit on key length
MAX_TENSOR_NAME_LENGTH = 1024
# Generous caps that still bound memory on a corrupt length: real chat templates are ~10 KB, an embedded
# tokenizer.json a few MB, and a 256k-token vocabulary with merges ~20 MB of header.
MAX_STRING_LENGTH = 64 << 20
MAX_HEADER_BYTES = 256 << 20
# Numeric arrays at least this long come back as numpy arrays; shorter ones as python lists.
NUMPY_ARRAY_THRESHOLD = 256
# The first header read; grows by doubling, so a large vocabulary costs at most ~2x its size in copies.
_INITIAL_READ = 2 << 20
# A count or length that would not fit in the file is reported as "absurd" from this size on, and as
# truncation below it (a cut-off file is the likelier story for a modest number).
_ABSURD_COUNT = 1 << 24


class GGUFValueType:
    """GGUF metadata value type ids (the file format's enum)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_VT = GGUFValueType
_SCALAR_STRUCTS: dict[int, struct.Struct] = {
    _VT.UINT8: struct.Struct("<B"),
    _VT.INT8: struct.Struct("<b"),
    _VT.UINT16: struct.Struct("<H"),
    _VT.INT16: struct.Struct("<h"),
    _VT.UINT32: struct.Struct("<I"),
    _VT.INT32: struct.Struct("<i"),
    _VT.FLOAT32: struct.Struct("<f"),
    _VT.BOOL: struct.Struct("<B"),
    _VT.UINT64: struct.Struct("<Q"),
    _VT.INT64: struct.Struct("<q"),
    _VT.FLOAT64: struct.Struct("<d"),
}
_NUMPY_DTYPES: dict[int, np.dtype] = {
    _VT.UINT8: np.dtype("u1"),
    _VT.INT8: np.dtype("i1"),
    _VT.UINT16: np.dtype("<u2"),
    _VT.INT16: np.dtype("<i2"),
    _VT.UINT32: np.dtype("<u4"),
    _VT.INT32: np.dtype("<i4"),
    _VT.FLOAT32: np.dtype("<f4"),
    _VT.BOOL: np.dtype("u1"),
    _VT.UINT64: np.dtype("<u8"),
    _VT.INT64: np.dtype("<i8"),
    _VT.FLOAT64: np.dtype("<f8"),
}
# Smallest encoding of one array element of each type: bounds a count before anything is allocated.
_MIN_ELEMENT_SIZE: dict[int, int] = {t: s.size for t, s in _SCALAR_STRUCTS.items()}
_MIN_ELEMENT_SIZE[_VT.STRING] = 8
_MIN_ELEMENT_SIZE[_VT.ARRAY] = 12
_MIN_KV_SIZE = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset

_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from


@dataclass(frozen=True, slots=True)
class GGMLTypeInfo:
    """Storage layout of a ggml tensor type: `type_size` bytes per block of `block_size` elements."""

    type_id: int
    name: str
    block_size: int
    type_size: int


# The size table comes from the gguf package so that new quant types need no change here.
GGML_TYPES: dict[int, GGMLTypeInfo] = {
    int(t): GGMLTypeInfo(int(t), t.name, int(bs), int(ts)) for t, (bs, ts) in gguf.GGML_QUANT_SIZES.items()
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
    _mm: np.memmap | None = field(default=None, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor_bytes(self, name: str) -> np.memmap:
        """The raw bytes of tensor `name`: a read-only uint8 view into the file's memory map (no copy)."""
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
            size = os.fstat(f.fileno()).st_size  # the file we actually opened, not whatever stat() saw
            head = f.read(8)
            try:
                _check_magic_and_version(head, size)
            except ModelFormatError as e:
                raise ModelFormatError(f"{p}: {e}") from None
            mm = np.memmap(f, dtype=np.uint8, mode="r", shape=(size,))
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {p}: {e.strerror or e}") from None
    try:
        return _Parser(mm, size, p).parse()
    except ModelFormatError as e:
        raise ModelFormatError(f"{p}: {e}") from None
    except (ValueError, OverflowError, struct.error, UnicodeError, IndexError, MemoryError) as e:
        # A check above missed something: still report it as a format error, never a crash.
        raise ModelFormatError(f"{p}: malformed GGUF file: {type(e).__name__}: {e}") from e


def _check_magic_and_version(head: bytes, size: int) -> None:
    if size < 4:
        raise ModelFormatError(f"not a GGUF file: it is only {size} bytes")
    if head[:4] != GGUF_MAGIC:
        hint = ""
        if head.startswith(b"version "):
            hint = "; it looks like a Git LFS pointer, not the model itself"
        elif head[:1] in (b"<", b"{"):
            hint = "; it looks like a text/HTML/JSON file"
        raise ModelFormatError(f"not a GGUF file (bad magic {head[:4]!r}){hint}")
    if size < 8:
        raise ModelFormatError(f"truncated GGUF: only {size} bytes, too short for a header")
    version = _U32(head, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(head[4:8], "big")
        if swapped in (1, 2, 3):
            raise ModelFormatError(f"big-endian GGUF (version {swapped}) is not supported")
        if version == 1:
            raise ModelFormatError("GGUF version 1 is not supported (need 2 or 3)")
        raise ModelFormatError(f"unsupported GGUF version {version} (need 2 or 3)")
    if size < HEADER_SIZE:
        raise ModelFormatError(f"truncated GGUF: only {size} bytes, too short for a header")


class _Parser:
    """Cursor over a growing in-memory copy of the file's head; every read is bounds-checked."""

    def __init__(self, mm: np.memmap, size: int, path: Path) -> None:
        self.mm = mm
        self.size = size
        self.path = path
        self.buf = b""
        self.blen = 0
        self.pos = 0

    # -- low-level reads -------------------------------------------------------------------------------

    def _fill(self, end: int, what: str) -> None:
        """Make buf cover [0, end) or raise: the caller has already seen end > blen."""
        if end > self.size:
            raise ModelFormatError(
                f"truncated GGUF: {what} at offset {self.pos} runs past the end of the file "
                f"({self.size} bytes)"
            )
        if end > MAX_HEADER_BYTES:
            raise ModelFormatError(
                f"{what} at offset {self.pos} lies beyond the first {MAX_HEADER_BYTES >> 20} MiB: "
                "metadata and tensor table that large are not plausible"
            )
        new_len = min(self.size, MAX_HEADER_BYTES, max(end, 2 * self.blen, _INITIAL_READ))
        self.buf = self.mm[:new_len].tobytes()
        self.blen = new_len

    def _u32(self, what: str) -> int:
        end = self.pos + 4
        if end > self.blen:
            self._fill(end, what)
        v = _U32(self.buf, self.pos)[0]
        self.pos = end
        return v

    def _u64(self, what: str) -> int:
        end = self.pos + 8
        if end > self.blen:
            self._fill(end, what)
        v = _U64(self.buf, self.pos)[0]
        self.pos = end
        return v

    def _check_count(self, count: int, min_size: int, kind: str, what: str, at: int) -> None:
        need = count * min_size
        remaining = self.size - self.pos
        if need <= remaining:
            return
        if need > self.size and count >= _ABSURD_COUNT:
            raise ModelFormatError(
                f"absurd {kind} {count} for {what} at offset {at}: the whole file is only {self.size} bytes"
            )
        raise ModelFormatError(
            f"truncated GGUF: {kind} {count} for {what} at offset {at} needs at least {need} bytes "
            f"but only {remaining} remain"
        )

    def _string_bytes(self, what: str, max_len: int = MAX_STRING_LENGTH) -> bytes:
        at = self.pos
        n = self._u64(f"{what} length")
        self._check_count(n, 1, "string length", what, at)
        if n > max_len:
            raise ModelFormatError(f"{what} at offset {at} is {n} bytes long (limit {max_len})")
        end = self.pos + n
        if end > self.blen:
            self._fill(end, what)
        raw = self.buf[self.pos : end]
        self.pos = end
        return raw

    def _strict_str(self, what: str, max_len: int) -> str:
        at = self.pos
        raw = self._string_bytes(what, max_len)
        if not raw:
            raise ModelFormatError(f"empty {what} at offset {at}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{what} at offset {at} is not valid UTF-8: {raw[:64]!r}") from None

    # -- metadata values -------------------------------------------------------------------------------

    def _value(self, vtype: int, what: str, depth: int) -> Any:
        st = _SCALAR_STRUCTS.get(vtype)
        if st is not None:
            end = self.pos + st.size
            if end > self.blen:
                self._fill(end, what)
            v = st.unpack_from(self.buf, self.pos)[0]
            if vtype == _VT.BOOL:
                if v > 1:
                    raise ModelFormatError(f"invalid bool value {v} for {what} at offset {self.pos}")
                v = bool(v)
            self.pos = end
            return v
        if vtype == _VT.STRING:
            return self._string_bytes(what).decode("utf-8", errors="replace")
        if vtype == _VT.ARRAY:
            return self._array(what, depth + 1)
        raise ModelFormatError(f"unknown metadata value type {vtype} for {what} at offset {self.pos - 4}")

    def _array(self, what: str, depth: int) -> Any:
        at = self.pos
        if depth > MAX_ARRAY_DEPTH:
            raise ModelFormatError(f"arrays nested deeper than {MAX_ARRAY_DEPTH} in {what} at offset {at}")
        etype = self._u32(f"{what} array element type")
        count = self._u64(f"{what} array length")
        min_size = _MIN_ELEMENT_SIZE.get(etype)
        if min_size is None:
            raise ModelFormatError(f"unknown metadata array element type {etype} for {what} at offset {at}")
        self._check_count(count, min_size, "array length", what, at)
        if etype == _VT.STRING:
            return self._string_array(count, what)
        if etype == _VT.ARRAY:
            return [self._array(f"{what}[{i}]", depth + 1) for i in range(count)]
        dtype = _NUMPY_DTYPES[etype]
        end = self.pos + count * dtype.itemsize
        if end > self.blen:
            self._fill(end, what)
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        if etype == _VT.BOOL:
            if count and int(arr.max()) > 1:
                raise ModelFormatError(f"invalid bool value in array {what} at offset {self.pos}")
            arr = arr.astype(bool)
        self.pos = end
        if count < NUMPY_ARRAY_THRESHOLD:
            return arr.tolist()
        arr = arr.copy()  # don't pin the whole header copy in memory
        arr.flags.writeable = False
        return arr

    def _string_array(self, count: int, what: str) -> list[str]:
        # The hot path of opening a model (~100k vocabulary/merge strings): locals only, one check per item.
        out: list[str] = []
        append = out.append
        u64 = _U64
        size = self.size
        max_len = MAX_STRING_LENGTH
        buf, blen, pos = self.buf, self.blen, self.pos
        for i in range(count):
            end = pos + 8
            if end > blen:
                self.pos = pos
                self._fill(end, f"{what}[{i}] length")
                buf, blen = self.buf, self.blen
            n = u64(buf, pos)[0]
            pos = end
            end = pos + n
            if n > max_len:
                self.pos = pos
                self._check_count(n, 1, "string length", f"{what}[{i}]", pos - 8)
                raise ModelFormatError(f"{what}[{i}] at offset {pos - 8} is {n} bytes long (limit {max_len})")
            if end > blen:
                if end > size:
                    self.pos = pos
                    self._check_count(n, 1, "string length", f"{what}[{i}]", pos - 8)
                self.pos = pos
                self._fill(end, f"{what}[{i}]")
                buf, blen = self.buf, self.blen
            append(buf[pos:end].decode("utf-8", "replace"))
            pos = end
        self.pos = pos
        return out

    # -- the file ----------------------------------------------------------------------------------------

    def parse(self) -> GGUFFile:
        size = self.size
        self._fill(HEADER_SIZE, "header")
        version = _U32(self.buf, 4)[0]
        self.pos = 8
        tensor_count = self._u64("tensor count")
        kv_count = self._u64("metadata count")
        body = size - HEADER_SIZE
        if tensor_count * _MIN_TENSOR_INFO_SIZE > size and tensor_count >= _ABSURD_COUNT:
            raise ModelFormatError(
                f"absurd tensor count {tensor_count}: a {size}-byte file can hold at most "
                f"{body // _MIN_TENSOR_INFO_SIZE} tensor infos"
            )
        if kv_count * _MIN_KV_SIZE > size and kv_count >= _ABSURD_COUNT:
            raise ModelFormatError(
                f"absurd metadata count {kv_count}: a {size}-byte file can hold at most "
                f"{body // _MIN_KV_SIZE} key/value pairs"
            )
        if tensor_count * _MIN_TENSOR_INFO_SIZE + kv_count * _MIN_KV_SIZE > body:
            raise ModelFormatError(
                f"truncated GGUF: {kv_count} key/value pairs and {tensor_count} tensor infos cannot fit "
                f"in a {size}-byte file"
            )

        metadata: dict[str, Any] = {}
        types: dict[str, int] = {}
        for i in range(kv_count):
            at = self.pos
            key = self._strict_str(f"metadata key #{i}", MAX_KEY_LENGTH)
            if key in metadata:
                raise ModelFormatError(f"duplicate metadata key '{key}' at offset {at}")
            vtype = self._u32(f"value type of '{key}'")
            metadata[key] = self._value(vtype, f"'{key}'", 0)
            types[key] = vtype

        alignment = self._alignment(metadata, types)

        raw_tensors: list[tuple[str, tuple[int, ...], int, int]] = []
        seen: set[str] = set()
        for i in range(tensor_count):
            at = self.pos
            name = self._strict_str(f"tensor name #{i}", MAX_TENSOR_NAME_LENGTH)
            if name in seen:
                raise ModelFormatError(f"duplicate tensor name '{name}' at offset {at}")
            seen.add(name)
            n_dims = self._u32(f"n_dims of tensor '{name}'")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFormatError(f"tensor '{name}' has n_dims {n_dims} (must be 1..{MAX_DIMS})")
            shape = tuple(self._u64(f"dims of tensor '{name}'") for _ in range(n_dims))
            ggml_type = self._u32(f"type of tensor '{name}'")
            rel = self._u64(f"offset of tensor '{name}'")
            raw_tensors.append((name, shape, ggml_type, rel))

        data_offset = -(-self.pos // alignment) * alignment
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
            path=self.path,
            version=version,
            file_size=size,
            alignment=alignment,
            data_offset=data_offset,
            metadata=metadata,
            metadata_types=types,
            tensors=tensors,
            _mm=self.mm,
        )

    @staticmethod
    def _alignment(metadata: dict[str, Any], types: dict[str, int]) -> int:
        if "general.alignment" not in metadata:
            return DEFAULT_ALIGNMENT
        value = metadata["general.alignment"]
        if types["general.alignment"] != _VT.UINT32:
            raise ModelFormatError(
                f"general.alignment must be a uint32, got value type {types['general.alignment']}"
            )
        if value < 1 or value & (value - 1) or value > MAX_ALIGNMENT:
            raise ModelFormatError(
                f"general.alignment {value} is invalid (must be a power of two up to {MAX_ALIGNMENT})"
            )
        return value
