"""The memory-mapped vector file kept beside the SQLite store, one per collection: what dense search reads.

SQLite stays the source of truth (its ``chunks.vector`` column). This file is a derived cache, laid out
for scanning: a JSON header (4 KiB), the chunk ids (int64, ascending), the quantized prefix codes
(prefix_codes) and the full vectors as float16. It is stamped with what it was built from: the
collection's embedder fingerprint and dimension, its rotation, and the chunk table's row count, largest
chunk id and latest document write time (an edit, an addition or a deletion changes at least one of
these: ids are never reused while a larger one exists, and a re-written last document gets a new write
time). A missing, unreadable or stale file is rebuilt from SQLite into a temporary file that is renamed
over the old one, so readers never see half a file; a read-only folder falls back to building in memory.

Memory mapping means a search touches the pages of the codes (``n * code_bytes``) and of the shortlisted
rows only; the OS page cache holds them across queries and processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ripelm.runtime.retrieval.prefix_codes import PrefixCodes, code_bytes, encode, fit_scale
from ripelm.runtime.retrieval.store import Collection, Store

MAGIC = b"RIPEVEC1"
HEADER = 4096
FORMAT = 1
_BLOCK = 65536


def sidecar_path(store: Store, c: Collection) -> Path:
    return store.path.with_name(f"{store.path.name}.c{c.id}.vec")


def stamp(store: Store, c: Collection, kind: str, d: int) -> dict:
    n, max_id = store.db.execute(
        "SELECT count(*), coalesce(max(id), 0) FROM chunks WHERE collection_id = ?", [c.id]
    ).fetchone()
    last = store.db.execute(
        "SELECT coalesce(max(indexed_at), 0) FROM documents WHERE collection_id = ?", [c.id]
    ).fetchone()[0]
    rot = hashlib.sha256(
        (c.rotation.tobytes() if c.rotation is not None else b"")
        + (c.rotation_mean.tobytes() if c.rotation_mean is not None else b"")
    ).hexdigest()[:16]
    return {
        "format": FORMAT,
        "fingerprint": c.fingerprint,
        "dim": c.dim,
        "matryoshka": c.matryoshka,
        "rotation": rot,
        "rows": int(n),
        "max_id": int(max_id),
        "last_write": float(last),
        "kind": kind,
        "d": d,
    }


@dataclass
class VectorFile:
    ids: np.ndarray  # (n,) int64 ascending
    full: np.ndarray  # (n, dim) float16 unit vectors
    codes: PrefixCodes
    mean: np.ndarray  # (dim,) the centring the codes were made with
    stamp: dict
    path: Path | None  # None: built in memory

    @property
    def index_bytes(self) -> int:
        """Memory a query's shortlist scan touches: the codes, plus the ids that name its rows."""
        return self.codes.nbytes + int(self.ids.nbytes)


def _rotation(c: Collection) -> np.ndarray | None:
    return None if c.matryoshka else c.rotation


def prefix_of(x: np.ndarray, mean: np.ndarray, rotation: np.ndarray | None, d: int) -> np.ndarray:
    centred = np.asarray(x, dtype=np.float32) - mean
    return centred[:, :d] if rotation is None else centred @ rotation[:, :d]


def _layout(n: int, dim: int, kind: str, d: int) -> tuple[int, int, int, int]:
    """Offsets of the ids, codes and full vectors, and the file size. After the header: the centring
    mean (dim float32) and the int8 scale (d float32)."""

    def up(x: int) -> int:
        return (x + 63) // 64 * 64

    ids_off = up(HEADER + 4 * (dim + d))
    codes_off = up(ids_off + 8 * n)
    full_off = up(codes_off + n * code_bytes(kind, d))
    return ids_off, codes_off, full_off, full_off + 2 * n * dim


def read(path: Path, want: dict) -> VectorFile | None:
    """The file at ``path`` mapped read-only, or None when it is missing, damaged or not ``want``."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
        if len(head) < HEADER or head[:8] != MAGIC:
            return None
        size = int.from_bytes(head[8:12], "little")
        meta = json.loads(head[12 : 12 + size])
        if meta.get("stamp") != want:
            return None
        n, dim, kind, d = meta["n"], meta["dim"], want["kind"], want["d"]
        ids_off, codes_off, full_off, end = _layout(n, dim, kind, d)
        if os.path.getsize(path) != end:
            return None
        if n == 0:
            ids, codes, full = np.zeros(0, np.int64), np.zeros((0, code_bytes(kind, d)), np.uint8), None
            full = np.zeros((0, dim), np.float16)
        else:
            ids = np.memmap(path, np.int64, "r", ids_off, (n,))
            dt = np.int8 if kind == "int8" else np.uint8
            codes = np.memmap(path, dt, "r", codes_off, (n, code_bytes(kind, d)))
            full = np.memmap(path, np.float16, "r", full_off, (n, dim))
        mean = np.fromfile(path, np.float32, dim, offset=HEADER)
        scale = np.fromfile(path, np.float32, d, offset=HEADER + 4 * dim) if kind == "int8" else None
        return VectorFile(ids, full, PrefixCodes(kind, d, codes, scale), mean, want, path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _fill(store: Store, c: Collection, n: int, ids: np.ndarray, full: np.ndarray) -> int:
    at = 0
    cur = store.db.execute("SELECT id, vector FROM chunks WHERE collection_id = ? ORDER BY id", [c.id])
    while at < n:
        rows = cur.fetchmany(_BLOCK)
        if not rows:
            break
        rows = rows[: n - at]
        ids[at : at + len(rows)] = [r[0] for r in rows]
        full[at : at + len(rows)] = np.frombuffer(b"".join(r[1] for r in rows), np.float16).reshape(
            len(rows), c.dim
        )
        at += len(rows)
    return at


def _sweep(path: Path, older_than: float = 600.0) -> None:
    """Remove temporary files of builds that were killed (a live build is minutes old at most)."""
    import time

    for tmp in path.parent.glob(path.name + ".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than:
                tmp.unlink()
        except OSError:
            pass


def build(store: Store, c: Collection, kind: str, d: int, path: Path | None) -> VectorFile:
    """Read the collection's vectors from SQLite (one read transaction) and write the file (or memory)."""
    if path is not None:
        _sweep(path)
    conn = store.db.conn
    own = not conn.in_transaction  # a consistent snapshot: the stamp and the rows from the same state
    if own:
        conn.execute("BEGIN")
    try:
        want = stamp(store, c, kind, d)
        n, dim = want["rows"], c.dim
        ids_off, codes_off, full_off, end = _layout(n, dim, kind, d)
        tmp = None
        if path is not None:
            try:
                fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
                os.close(fd)
                with open(tmp, "r+b") as f:
                    f.truncate(end)
            except OSError:
                tmp = None
        if tmp is not None and n:
            ids = np.memmap(tmp, np.int64, "r+", ids_off, (n,))
            full = np.memmap(tmp, np.float16, "r+", full_off, (n, dim))
        else:
            ids, full = np.zeros(n, np.int64), np.zeros((n, dim), np.float16)
        n = _fill(store, c, n, ids, full)
    finally:
        if own:
            conn.commit()  # ends the read transaction (nothing was written)
    mean = c.rotation_mean if (c.rotation_mean is not None and not c.matryoshka) else None
    if mean is None:
        acc = np.zeros(dim, np.float64)
        for s in range(0, n, _BLOCK):
            acc += full[s : s + _BLOCK].astype(np.float64).sum(axis=0)
        mean = (acc / max(n, 1)).astype(np.float32)
    rot = _rotation(c)
    scale = None
    if kind == "int8" and n:
        pick = np.sort(np.random.default_rng(0).choice(n, min(n, 200_000), replace=False))
        scale = fit_scale(prefix_of(full[pick], mean, rot, d))
    dt = np.int8 if kind == "int8" else np.uint8
    if tmp is not None and n:
        codes = np.memmap(tmp, dt, "r+", codes_off, (n, code_bytes(kind, d)))
    else:
        codes = np.zeros((n, code_bytes(kind, d)), dt)
    for s in range(0, n, _BLOCK):
        codes[s : s + _BLOCK] = encode(prefix_of(full[s : s + _BLOCK], mean, rot, d), kind, scale)
    vf = VectorFile(ids, full, PrefixCodes(kind, d, codes, scale), mean, want, None)
    if tmp is None:
        return vf
    try:
        for m in (ids, full, codes):
            if isinstance(m, np.memmap):
                m.flush()
        meta = json.dumps({"stamp": want, "n": n, "dim": dim}).encode()
        if 12 + len(meta) > HEADER:
            raise OSError("header too large")
        with open(tmp, "r+b") as f:
            f.seek(HEADER)
            f.write(mean.astype(np.float32).tobytes())
            f.write((scale if scale is not None else np.zeros(d, np.float32)).astype(np.float32).tobytes())
            f.seek(0)
            f.write(MAGIC + len(meta).to_bytes(4, "little") + meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        codes_mem = PrefixCodes(kind, d, np.array(codes), scale)
        return VectorFile(np.array(ids), np.array(full), codes_mem, mean, want, None)
    return read(path, want) or vf


def open_vectors(store: Store, c: Collection, kind: str, d: int) -> VectorFile:
    """The collection's vector file, rebuilt first when it is missing or stale."""
    path = sidecar_path(store, c)
    want = stamp(store, c, kind, d)
    vf = read(path, want)
    if vf is not None:
        return vf
    return build(store, c, kind, d, path if os.access(path.parent, os.W_OK) else None)


def remove(store: Store, c: Collection) -> None:
    sidecar_path(store, c).unlink(missing_ok=True)
