"""Bounds-checked reading of a GGUF file's header and metadata (the byte-level half of `gguf_file`).

`HeaderReader` walks a growing in-memory copy of the file's head. Every count and length it reads is
checked against the bytes left in the file before anything is allocated from it, strings and the whole
header region are capped (MAX_STRING_LENGTH, MAX_HEADER_BYTES), and every failure is a `ModelFormatError`
naming what is wrong and where. Only little-endian files are read; big-endian ones are rejected by name.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ripelm.models.errors import ModelFormatError

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
ABSURD_COUNT = 1 << 24


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
MIN_KV_SIZE = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset

U32 = struct.Struct("<I").unpack_from
U64 = struct.Struct("<Q").unpack_from


def check_magic_and_version(head: bytes, size: int) -> None:
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
    version = U32(head, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(head[4:8], "big")
        if swapped in (1, 2, 3):
            raise ModelFormatError(f"big-endian GGUF (version {swapped}) is not supported")
        if version == 1:
            raise ModelFormatError("GGUF version 1 is not supported (need 2 or 3)")
        raise ModelFormatError(f"unsupported GGUF version {version} (need 2 or 3)")
    if size < HEADER_SIZE:
        raise ModelFormatError(f"truncated GGUF: only {size} bytes, too short for a header")


class HeaderReader:
    """Cursor over a growing in-memory copy of the file's head; every read is bounds-checked."""

    def __init__(self, mm: np.memmap, size: int, path: Path) -> None:
        self.mm = mm
        self.size = size
        self.path = path
        self.buf = b""
        self.blen = 0
        self.pos = 0

    # -- low-level reads -------------------------------------------------------------------------------

    def fill(self, end: int, what: str) -> None:
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

    def u32(self, what: str) -> int:
        end = self.pos + 4
        if end > self.blen:
            self.fill(end, what)
        v = U32(self.buf, self.pos)[0]
        self.pos = end
        return v

    def u64(self, what: str) -> int:
        end = self.pos + 8
        if end > self.blen:
            self.fill(end, what)
        v = U64(self.buf, self.pos)[0]
        self.pos = end
        return v

    def _check_count(self, count: int, min_size: int, kind: str, what: str, at: int) -> None:
        need = count * min_size
        remaining = self.size - self.pos
        if need <= remaining:
            return
        if need > self.size and count >= ABSURD_COUNT:
            raise ModelFormatError(
                f"absurd {kind} {count} for {what} at offset {at}: the whole file is only {self.size} bytes"
            )
        raise ModelFormatError(
            f"truncated GGUF: {kind} {count} for {what} at offset {at} needs at least {need} bytes "
            f"but only {remaining} remain"
        )

    def _string_bytes(self, what: str, max_len: int = MAX_STRING_LENGTH) -> bytes:
        at = self.pos
        n = self.u64(f"{what} length")
        self._check_count(n, 1, "string length", what, at)
        if n > max_len:
            raise ModelFormatError(f"{what} at offset {at} is {n} bytes long (limit {max_len})")
        end = self.pos + n
        if end > self.blen:
            self.fill(end, what)
        raw = self.buf[self.pos : end]
        self.pos = end
        return raw

    def strict_str(self, what: str, max_len: int) -> str:
        at = self.pos
        raw = self._string_bytes(what, max_len)
        if not raw:
            raise ModelFormatError(f"empty {what} at offset {at}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{what} at offset {at} is not valid UTF-8: {raw[:64]!r}") from None

    # -- metadata values -------------------------------------------------------------------------------

    def value(self, vtype: int, what: str, depth: int) -> Any:
        st = _SCALAR_STRUCTS.get(vtype)
        if st is not None:
            end = self.pos + st.size
            if end > self.blen:
                self.fill(end, what)
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
        etype = self.u32(f"{what} array element type")
        count = self.u64(f"{what} array length")
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
            self.fill(end, what)
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
        u64 = U64
        size = self.size
        max_len = MAX_STRING_LENGTH
        buf, blen, pos = self.buf, self.blen, self.pos
        for i in range(count):
            end = pos + 8
            if end > blen:
                self.pos = pos
                self.fill(end, f"{what}[{i}] length")
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
                self.fill(end, f"{what}[{i}]")
                buf, blen = self.buf, self.blen
            append(buf[pos:end].decode("utf-8", "replace"))
            pos = end
        self.pos = pos
        return out

    # -- the file ----------------------------------------------------------------------------------------
