"""The retrieval store: one SQLite file (sqlite-utils, WAL) that is the source of truth for collections.

Tables: ``collections`` (embedder name and fingerprint, dimension, Matryoshka flag, chunking settings, the
PCA rotation for non-Matryoshka embedders), ``documents`` (path, content hash, size, mtime), ``chunks``
(text, page, line range, heading, one float16 vector at full dimension) and ``chunks_fts`` (FTS5 over
chunk text, kept in step by triggers). Every document is replaced in a single transaction, so a killed
indexer leaves each document either fully old, fully new, or absent.

Durability: WAL with ``synchronous=NORMAL``. A killed process (SIGKILL, a crash) never corrupts the file
nor loses a committed transaction in WAL mode at either setting; NORMAL only lets a power loss or OS crash
roll back the last few commits, and everything here is derived from files on disk that the next
``ripe index`` re-reads (a missing document is simply indexed again). FULL would add an fsync per
document for no gain in what a user can lose. tests/test_index_crash.py SIGKILLs the indexer to check it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlite_utils

from ripelm.runtime.retrieval.chunking import Chunk
from ripelm.runtime.retrieval.errors import CollectionNotFoundError, StoreError

SCHEMA_VERSION = 1


@dataclass
class Collection:
    id: int
    name: str
    embedder: str
    embedder_path: str
    fingerprint: str
    dim: int
    matryoshka: bool
    chunk_size: int
    chunk_overlap: int
    rotation: np.ndarray | None  # (dim, dim) float32, columns = principal directions, or None
    rotation_mean: np.ndarray | None  # (dim,) float32
    rotation_chunks: int  # how many chunks the rotation was fitted on
    created: float
    updated: float


@dataclass
class DocumentRow:
    id: int
    path: str
    content_hash: str
    size: int
    mtime: float
    kind: str
    n_chunks: int


@dataclass
class ChunkRow:
    id: int
    path: str
    seq: int
    text: str
    page: int | None
    line_start: int
    line_end: int
    heading: str | None


def _blob(a: np.ndarray | None, dtype: type = np.float32) -> bytes | None:
    return None if a is None else np.ascontiguousarray(a, dtype=dtype).tobytes()


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(self.path)
        self.db.execute("PRAGMA busy_timeout = 10000")
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous = NORMAL")  # see the module docstring
        self.db.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.db.atomic():
            meta = self.db["meta"]
            if not meta.exists():
                self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer ripelm (schema {version})")
            if version == SCHEMA_VERSION:
                return
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS collections (
                    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, embedder TEXT NOT NULL,
                    embedder_path TEXT NOT NULL, fingerprint TEXT NOT NULL, dim INTEGER NOT NULL,
                    matryoshka INTEGER NOT NULL, chunk_size INTEGER NOT NULL, chunk_overlap INTEGER NOT NULL,
                    rotation BLOB, rotation_mean BLOB, rotation_chunks INTEGER NOT NULL DEFAULT 0,
                    created REAL NOT NULL, updated REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS documents (
                    id INTEGER PRIMARY KEY,
                    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
                    path TEXT NOT NULL, content_hash TEXT NOT NULL, size INTEGER NOT NULL,
                    mtime REAL NOT NULL,
                    kind TEXT NOT NULL, n_chunks INTEGER NOT NULL, indexed_at REAL NOT NULL,
                    UNIQUE (collection_id, path));
                CREATE TABLE IF NOT EXISTS chunks (
                    id INTEGER PRIMARY KEY,
                    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                    collection_id INTEGER NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL, page INTEGER,
                    line_start INTEGER NOT NULL, line_end INTEGER NOT NULL, heading TEXT,
                    vector BLOB NOT NULL);
                CREATE INDEX IF NOT EXISTS chunks_by_collection ON chunks (collection_id);
                CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (document_id);
                """
            )
            # sqlite-utils creates the FTS table and its triggers in separate scripts: a process killed in
            # between left an FTS table without triggers, which was never repaired. Rebuild it whole.
            triggers = {"chunks_ai", "chunks_ad", "chunks_au"}
            if not (self.db["chunks_fts"].exists() and triggers <= set(self.db.triggers_dict)):
                self.db.executescript(
                    "".join(f"DROP TRIGGER IF EXISTS {t};" for t in sorted(triggers))
                    + "DROP TABLE IF EXISTS chunks_fts;"
                )
                self.db["chunks"].enable_fts(["text"], create_triggers=True, tokenize="porter")
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    # collections ------------------------------------------------------------------------------------
    def _collection(self, row: dict) -> Collection:
        dim = int(row["dim"])
        rot = np.frombuffer(row["rotation"], np.float32).reshape(dim, dim) if row["rotation"] else None
        mean = np.frombuffer(row["rotation_mean"], np.float32) if row["rotation_mean"] else None
        return Collection(
            row["id"],
            row["name"],
            row["embedder"],
            row["embedder_path"],
            row["fingerprint"],
            dim,
            bool(row["matryoshka"]),
            row["chunk_size"],
            row["chunk_overlap"],
            rot,
            mean,
            row["rotation_chunks"],
            row["created"],
            row["updated"],
        )

    def collections(self) -> list[Collection]:
        return [self._collection(r) for r in self.db.query("SELECT * FROM collections ORDER BY name")]

    def find_collection(self, name: str) -> Collection | None:
        rows = list(self.db.query("SELECT * FROM collections WHERE name = ?", [name]))
        return self._collection(rows[0]) if rows else None

    def get_collection(self, name: str) -> Collection:
        c = self.find_collection(name)
        if c is None:
            names = ", ".join(x.name for x in self.collections()) or "none yet; create one with `ripe index`"
            raise CollectionNotFoundError(f"no collection named '{name}' (collections: {names})")
        return c

    def create_collection(
        self,
        name: str,
        *,
        embedder: str,
        embedder_path: str,
        fingerprint: str,
        dim: int,
        matryoshka: bool,
        chunk_size: int,
        chunk_overlap: int,
    ) -> Collection:
        now = time.time()
        with self.db.atomic():
            self.db["collections"].insert(
                {
                    "name": name,
                    "embedder": embedder,
                    "embedder_path": embedder_path,
                    "fingerprint": fingerprint,
                    "dim": dim,
                    "matryoshka": int(matryoshka),
                    "chunk_size": chunk_size,
                    "chunk_overlap": chunk_overlap,
                    "rotation": None,
                    "rotation_mean": None,
                    "rotation_chunks": 0,
                    "created": now,
                    "updated": now,
                }
            )
        return self.get_collection(name)

    def remove_collection(self, name: str) -> None:
        c = self.get_collection(name)
        with self.db.atomic():
            self.db.execute("DELETE FROM chunks WHERE collection_id = ?", [c.id])
            self.db.execute("DELETE FROM documents WHERE collection_id = ?", [c.id])
            self.db.execute("DELETE FROM collections WHERE id = ?", [c.id])
        # the collection's memory-mapped vector file (vector_file): a cache of what was just deleted
        self.path.with_name(f"{self.path.name}.c{c.id}.vec").unlink(missing_ok=True)

    def set_rotation(
        self, c: Collection, rotation: np.ndarray | None, mean: np.ndarray | None, n: int
    ) -> None:
        with self.db.atomic():
            self.db.execute(
                "UPDATE collections SET rotation = ?, rotation_mean = ?, rotation_chunks = ?, updated = ? "
                "WHERE id = ?",
                [_blob(rotation), _blob(mean), n, time.time(), c.id],
            )

    def touch(self, c: Collection) -> None:
        with self.db.atomic():
            self.db.execute("UPDATE collections SET updated = ? WHERE id = ?", [time.time(), c.id])

    # documents ---------------------------------------------------------------------------------------
    def documents(self, c: Collection) -> dict[str, DocumentRow]:
        rows = self.db.query(
            "SELECT id, path, content_hash, size, mtime, kind, n_chunks FROM documents "
            "WHERE collection_id = ?",
            [c.id],
        )
        return {r["path"]: DocumentRow(**r) for r in rows}

    def write_document(
        self,
        c: Collection,
        path: str,
        *,
        content_hash: str,
        size: int,
        mtime: float,
        kind: str,
        chunks: list[Chunk],
        vectors: np.ndarray,
    ) -> None:
        """Replace everything stored for ``path`` in one transaction."""
        if len(chunks) != len(vectors) or (len(vectors) and vectors.shape[1] != c.dim):
            raise ValueError("one vector of the collection's dimension per chunk")
        vecs = np.asarray(vectors, dtype=np.float16)
        with self.db.atomic():
            self.db.execute("DELETE FROM documents WHERE collection_id = ? AND path = ?", [c.id, path])
            cur = self.db.execute(
                "INSERT INTO documents (collection_id, path, content_hash, size, mtime, kind, n_chunks, "
                "indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [c.id, path, content_hash, size, mtime, kind, len(chunks), time.time()],
            )
            doc_id = cur.lastrowid
            self.db.conn.executemany(
                "INSERT INTO chunks (document_id, collection_id, seq, text, page, line_start, line_end, "
                "heading, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        doc_id,
                        c.id,
                        i,
                        ch.text,
                        ch.page,
                        ch.line_start,
                        ch.line_end,
                        ch.heading,
                        vecs[i].tobytes(),
                    )
                    for i, ch in enumerate(chunks)
                ],
            )

    def update_stat(self, c: Collection, path: str, size: int, mtime: float) -> None:
        with self.db.atomic():
            self.db.execute(
                "UPDATE documents SET size = ?, mtime = ? WHERE collection_id = ? AND path = ?",
                [size, mtime, c.id, path],
            )

    def delete_document(self, c: Collection, path: str) -> None:
        with self.db.atomic():
            self.db.execute("DELETE FROM documents WHERE collection_id = ? AND path = ?", [c.id, path])

    def clear(
        self,
        c: Collection,
        *,
        embedder: str,
        embedder_path: str,
        fingerprint: str,
        dim: int,
        matryoshka: bool,
    ) -> Collection:
        """Drop every document and vector of ``c`` and record a new embedder: an explicit full rebuild."""
        with self.db.atomic():
            self.db.execute("DELETE FROM chunks WHERE collection_id = ?", [c.id])
            self.db.execute("DELETE FROM documents WHERE collection_id = ?", [c.id])
            self.db.execute(
                "UPDATE collections SET embedder = ?, embedder_path = ?, fingerprint = ?, dim = ?, "
                "matryoshka = ?, rotation = NULL, rotation_mean = NULL, rotation_chunks = 0, updated = ? "
                "WHERE id = ?",
                [embedder, embedder_path, fingerprint, dim, int(matryoshka), time.time(), c.id],
            )
        return self.get_collection(c.name)

    # chunks ------------------------------------------------------------------------------------------
    def chunk_count(self, c: Collection) -> int:
        return int(
            self.db.execute("SELECT count(*) FROM chunks WHERE collection_id = ?", [c.id]).fetchone()[0]
        )

    def vectors(self, c: Collection) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, float16 vectors (n, dim)) of the whole collection, in id order."""
        rows = self.db.execute(
            "SELECT id, vector FROM chunks WHERE collection_id = ? ORDER BY id", [c.id]
        ).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, np.zeros((0, c.dim), dtype=np.float16)
        mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), c.dim)
        return ids, mat

    def chunks_by_id(self, ids: list[int]) -> dict[int, ChunkRow]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.query(
            "SELECT chunks.id, documents.path, seq, text, page, line_start, line_end, heading FROM chunks "
            f"JOIN documents ON documents.id = chunks.document_id WHERE chunks.id IN ({marks})",
            [int(i) for i in ids],
        )
        return {r["id"]: ChunkRow(**r) for r in rows}

    def bm25(self, c: Collection, match: str, limit: int) -> list[tuple[int, float]]:
        """(chunk id, score) best first for an FTS5 MATCH expression; higher score is better."""
        if not match:
            return []
        rows = self.db.execute(
            "SELECT chunks_fts.rowid, bm25(chunks_fts) AS r FROM chunks_fts JOIN chunks ON chunks.id = "
            "chunks_fts.rowid WHERE chunks_fts MATCH ? AND chunks.collection_id = ? ORDER BY r LIMIT ?",
            [match, c.id, limit],
        ).fetchall()
        return [(int(i), -float(r)) for i, r in rows]

    def iter_chunk_texts(self, c: Collection) -> Iterator[tuple[int, str]]:
        yield from self.db.execute("SELECT id, text FROM chunks WHERE collection_id = ? ORDER BY id", [c.id])

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
