"""Malformed-GGUF generation for the fuzz tests: a field map of real files, mutators, and the case runner.

`field_map` walks a well-formed GGUF file and records where every header field, metadata entry and tensor
info lies, so mutations can aim at the interesting bytes: counts and lengths get huge values, truncations
fall on every region boundary, tensor offsets become misaligned, out of range or overlapping, value and
tensor types become wrong or unknown, entries get duplicated, arrays get nested.

`run_case` is the property every input must satisfy: loading it (open, validate, build the config and,
for small files, map the tensors into a packed model) either works or raises ModelFormatError /
UnsupportedModelError with a message; anything else is a crash, and a case over `HANG_SECONDS` a hang.
"""

from __future__ import annotations

import random
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ripelm.models.errors import ModelFormatError, UnsupportedModelError
from ripelm.models.gguf_file import open_gguf
from ripelm.runtime.loader import check_supported, load_transformer

HANG_SECONDS = 2.0
# Files up to this size also get their tensors mapped into a model (the tiny seeds are ~50-200 KB).
MAP_TENSORS_BELOW = 4 << 20
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
# Values that break naive length/count/offset arithmetic.
INTERESTING_U64 = (
    0, 1, 2, 3, 7, 31, 33, 255, 4096, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
    (1 << 32) + 1, 1 << 40, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 32, (1 << 64) - 1,
)  # fmt: skip
INTERESTING_U32 = (
    0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 14, 39, 40, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
)  # fmt: skip


@dataclass
class Field:
    """One fixed-size field of the file: where it is, its width and what it means."""

    kind: str  # "count", "strlen", "vtype", "arrlen", "etype", "ndims", "dim", "ttype", "toffset", "value"
    start: int
    size: int  # 4 or 8 (or the scalar width for "value")


@dataclass
class Entry:
    """One metadata key/value pair or tensor info, as raw bytes with its span in the file."""

    start: int
    end: int
    name: str


@dataclass
class FieldMap:
    data: bytes
    fields: list[Field] = field(default_factory=list)
    kvs: list[Entry] = field(default_factory=list)
    tensors: list[Entry] = field(default_factory=list)
    header_end: int = 0  # end of the tensor table (before padding)
    data_offset: int = 0
    alignment: int = 32
    tensor_starts: list[int] = field(default_factory=list)  # absolute starts of the tensor data

    def boundaries(self) -> list[int]:
        """Every offset where one region ends and the next begins (truncating there is interesting)."""
        cuts = {0, 4, 8, 16, 24, self.header_end, self.data_offset, len(self.data)}
        for f in self.fields:
            cuts.update((f.start, f.start + f.size))
        for e in [*self.kvs, *self.tensors]:
            cuts.update((e.start, e.end))
        cuts.update(self.tensor_starts)
        return sorted(c for c in cuts if 0 <= c <= len(self.data))


def field_map(data: bytes) -> FieldMap:
    """Map a well-formed GGUF file (the seeds are written by gguf.GGUFWriter or llama.cpp)."""
    m = FieldMap(data)
    pos = 8
    m.fields.append(Field("count", 8, 8))
    m.fields.append(Field("count", 16, 8))
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def bounded(count: int, unit: int) -> int:
        # The map is for files that parse; a mutated one may lie, and must not make the walk explode.
        if count * unit > len(data) - pos:
            raise ValueError(f"count {count} does not fit in the file")
        return count

    bounded(n_tensors + n_kv, 8)

    def string(kind: str) -> tuple[str, int]:
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        m.fields.append(Field(kind, pos, 8))
        bounded(n, 1)
        s = data[pos + 8 : pos + 8 + n].decode("utf-8", "replace")
        pos += 8 + n
        return s, n

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype in _SCALAR_SIZES:
            m.fields.append(Field("value", pos, _SCALAR_SIZES[vtype]))
            pos += _SCALAR_SIZES[vtype]
        elif vtype == STRING:
            string("strlen")
        elif vtype != ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        else:
            etype, count = struct.unpack_from("<IQ", data, pos)
            m.fields.append(Field("etype", pos, 4))
            m.fields.append(Field("arrlen", pos + 4, 8))
            pos += 12
            bounded(count, _SCALAR_SIZES.get(etype, 8))
            if etype in _SCALAR_SIZES:
                pos += count * _SCALAR_SIZES[etype]
            else:
                for i in range(count):
                    if etype == STRING and i >= 16:  # map the first strings only (vocabularies are big)
                        n = struct.unpack_from("<Q", data, pos)[0]
                        pos += 8 + n
                    else:
                        value(etype)

    alignment = 32
    for _ in range(n_kv):
        start = pos
        key, _n = string("strlen")
        vtype = struct.unpack_from("<I", data, pos)[0]
        m.fields.append(Field("vtype", pos, 4))
        pos += 4
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, pos)[0]
        value(vtype)
        m.kvs.append(Entry(start, pos, key))
    rel_offsets = []
    for _ in range(n_tensors):
        start = pos
        name, _n = string("strlen")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        m.fields.append(Field("ndims", pos, 4))
        pos += 4
        for _d in range(bounded(n_dims, 8)):
            m.fields.append(Field("dim", pos, 8))
            pos += 8
        m.fields.append(Field("ttype", pos, 4))
        m.fields.append(Field("toffset", pos + 4, 8))
        rel_offsets.append(struct.unpack_from("<Q", data, pos + 4)[0])
        pos += 12
        m.tensors.append(Entry(start, pos, name))
    m.header_end = pos
    m.alignment = alignment
    m.data_offset = -(-pos // alignment) * alignment
    m.tensor_starts = [m.data_offset + r for r in rel_offsets]
    return m


def set_string_kv(data: bytes, key: str, value: str) -> bytes:
    """The file with metadata `key` set to the string `value` (replaced in place, or added at the end)."""
    fm = field_map(data)
    kb, vb = key.encode(), value.encode()
    entry = struct.pack("<Q", len(kb)) + kb + struct.pack("<IQ", STRING, len(vb)) + vb
    old = next((e for e in fm.kvs if e.name == key), None)
    if old is None:
        count = struct.unpack_from("<Q", data, 16)[0]
        at = fm.kvs[-1].end if fm.kvs else 24
        out = _put(data[:at], 16, struct.pack("<Q", count + 1)) + entry + data[at : fm.header_end]
    else:
        out = data[: old.start] + entry + data[old.end : fm.header_end]
    return out + bytes(-len(out) % fm.alignment) + data[fm.data_offset :]


# -- mutators: (rng, field map) -> new bytes ---------------------------------------------------------------


def _put(data: bytes, at: int, raw: bytes) -> bytes:
    return data[:at] + raw + data[at + len(raw) :]


def _pick(rng: random.Random, fm: FieldMap, *kinds: str) -> Field | None:
    cands = [f for f in fm.fields if f.kind in kinds]
    return rng.choice(cands) if cands else None


def mut_bit_flips(rng: random.Random, fm: FieldMap) -> bytes:
    out = bytearray(fm.data)
    limit = fm.data_offset if rng.random() < 0.9 else len(out)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        out[rng.randrange(limit)] ^= 1 << rng.randrange(8)
    return bytes(out)


def mut_random_bytes(rng: random.Random, fm: FieldMap) -> bytes:
    out = bytearray(fm.data)
    at = rng.randrange(fm.header_end)
    n = rng.randint(1, 16)
    out[at : at + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(out)


def mut_truncate_boundary(rng: random.Random, fm: FieldMap) -> bytes:
    cut = rng.choice(fm.boundaries()) + rng.choice((-1, 0, 0, 1))
    return fm.data[: max(0, cut)]


def mut_huge_length(rng: random.Random, fm: FieldMap) -> bytes:
    f = _pick(rng, fm, "count", "strlen", "arrlen", "dim")
    assert f is not None
    v = rng.choice(INTERESTING_U64 + (len(fm.data), len(fm.data) + 1, len(fm.data) // 2))
    return _put(fm.data, f.start, struct.pack("<Q", v % (1 << 64)))


def mut_wrong_type(rng: random.Random, fm: FieldMap) -> bytes:
    f = _pick(rng, fm, "vtype", "etype", "ttype", "ndims")
    assert f is not None
    v = rng.choice(INTERESTING_U32 + tuple(range(0, 42)))
    return _put(fm.data, f.start, struct.pack("<I", v))


def mut_tensor_offset(rng: random.Random, fm: FieldMap) -> bytes:
    f = _pick(rng, fm, "toffset")
    assert f is not None
    old = struct.unpack_from("<Q", fm.data, f.start)[0]
    others = [s - fm.data_offset for s in fm.tensor_starts]
    v = rng.choice(
        (
            old + 1,  # misaligned
            old + fm.alignment // 2,
            max(0, old - fm.alignment),  # overlaps its neighbour
            rng.choice(others),  # same start as another tensor
            rng.choice(others) + fm.alignment,  # inside another tensor
            len(fm.data),  # past the end
            len(fm.data) - fm.data_offset,
            rng.choice(INTERESTING_U64),
        )
    )
    return _put(fm.data, f.start, struct.pack("<Q", v % (1 << 64)))


def mut_scalar_value(rng: random.Random, fm: FieldMap) -> bytes:
    """Change a metadata number (block_count, head_count, token ids, alignment...) to an edge value."""
    f = _pick(rng, fm, "value")
    assert f is not None
    if f.size == 8:
        raw = struct.pack("<Q", rng.choice(INTERESTING_U64))
    elif f.size == 4:
        choice = rng.random()
        if choice < 0.3:  # a float32 field may be read as one
            raw = struct.pack("<f", rng.choice((0.0, -1.0, 1e-30, 1e38, float("inf"), float("nan"), 3.0)))
        else:
            raw = struct.pack("<I", rng.choice(INTERESTING_U32 + (6, 16, 48, 63, 64, 128, 4096)))
    else:
        raw = bytes(rng.randrange(256) for _ in range(f.size))
    return _put(fm.data, f.start, raw)


def mut_duplicate_entry(rng: random.Random, fm: FieldMap) -> bytes:
    """Insert a copy of a metadata entry or tensor info right after itself and bump the count."""
    is_tensor = bool(fm.tensors) and rng.random() < 0.4
    entries = fm.tensors if is_tensor else fm.kvs
    e = rng.choice(entries)
    chunk = fm.data[e.start : e.end]
    count_at = 8 if is_tensor else 16
    count = struct.unpack_from("<Q", fm.data, count_at)[0]
    out = fm.data[: e.end] + chunk + fm.data[e.end : fm.header_end]
    out = _put(out, count_at, struct.pack("<Q", count + 1))
    pad = -len(out) % fm.alignment
    return out + bytes(pad) + fm.data[fm.data_offset :]


def mut_nested_array(rng: random.Random, fm: FieldMap) -> bytes:
    """Append a metadata entry holding arrays nested `depth` deep (some lengths lying)."""
    depth = rng.randint(1, 12)
    inner = struct.pack("<IQ", 4, 2) + struct.pack("<II", 1, 2)
    for _ in range(depth):
        n = rng.choice((1, 1, 2, 1 << 40))
        inner = struct.pack("<IQ", ARRAY, n) + inner * (2 if n == 2 else 1)
    key = f"fuzz.nested{depth}".encode()
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<I", ARRAY) + inner
    count = struct.unpack_from("<Q", fm.data, 16)[0]
    at = fm.kvs[-1].end if fm.kvs else 24
    out = fm.data[:at] + entry + fm.data[at : fm.header_end]
    out = _put(out, 16, struct.pack("<Q", count + 1))
    return out + bytes(-len(out) % fm.alignment) + fm.data[fm.data_offset :]


def mut_swap_entries(rng: random.Random, fm: FieldMap) -> bytes:
    """Swap two tensor infos' type fields: every byte plausible, the sizes and layout wrong."""
    ttypes = [f for f in fm.fields if f.kind == "ttype"]
    a, b = rng.sample(ttypes, 2)
    va, vb = fm.data[a.start : a.start + 4], fm.data[b.start : b.start + 4]
    return _put(_put(fm.data, a.start, vb), b.start, va)


def mut_stack(rng: random.Random, fm: FieldMap) -> bytes:
    """Two or three mutations, each applied to the (re-mapped where possible) result of the last."""
    data = fm.data
    for _ in range(rng.randint(2, 3)):
        try:
            cur = field_map(data)
        except (struct.error, IndexError, ValueError, UnicodeError, OverflowError, MemoryError):
            break  # the previous mutation made the map unreadable: stop stacking
        data = rng.choice(SINGLE_MUTATORS)(rng, cur)
    return data


SINGLE_MUTATORS: tuple[Callable[[random.Random, FieldMap], bytes], ...] = (
    mut_bit_flips,
    mut_random_bytes,
    mut_truncate_boundary,
    mut_huge_length,
    mut_wrong_type,
    mut_tensor_offset,
    mut_scalar_value,
    mut_duplicate_entry,
    mut_nested_array,
    mut_swap_entries,
)
MUTATORS = (*SINGLE_MUTATORS, mut_stack)


# -- the property --------------------------------------------------------------------------------------------


class CaseHang(Exception):
    """Raised from the alarm when one case runs far past the hang limit."""


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Interrupt a case stuck in python code (the measured time decides hangs; this only unsticks)."""

    def fire(signum: int, frame: object) -> None:
        raise CaseHang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    kind: str  # "ok", "format", "unsupported"
    seconds: float
    message: str = ""


def run_case(path: Path) -> Outcome:
    """Open, validate, configure and (for small files) map one input; returns how it ended.

    Exceptions other than ModelFormatError / UnsupportedModelError propagate: they are crashes.
    """
    t0 = time.perf_counter()
    with alarm(HANG_SECONDS * 5):
        try:
            g = open_gguf(path)
            try:
                check_supported(g)
                if g.file_size <= MAP_TENSORS_BELOW:
                    load_transformer(g, device=torch.device("cpu"), dtype=torch.bfloat16)
            finally:
                g.close()
            kind, msg = "ok", ""
        except ModelFormatError as e:
            kind, msg = "format", str(e)
        except UnsupportedModelError as e:
            kind, msg = "unsupported", str(e)
    return Outcome(kind, time.perf_counter() - t0, msg)


def message_names_problem(msg: str, path: Path) -> bool:
    """A rejection message must say more than the file name: what is wrong (and usually where)."""
    rest = msg.replace(str(path), "").strip(" :")
    return len(rest) >= 12 and "Traceback" not in rest
