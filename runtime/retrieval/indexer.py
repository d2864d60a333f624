"""Index files into a collection, incrementally: only new or changed documents are read and embedded.

A file whose size and mtime match the stored row is not even read; one whose bytes hash the same is only
re-stamped; a changed one is re-chunked, re-embedded and replaced in one transaction; stored documents
under the indexed paths that are gone from disk are removed. Embedding is batched across documents (so
small files still keep every worker busy) but each document is written in its own transaction.
Embedding runs in a background thread, one batch at a time, while this thread reads and chunks the next
files and writes the batch before (llama.cpp releases the GIL): the embedder, which is nearly all the
work, never waits for SQLite or the file system, and at most two batches are held in memory. For an
embedder that is not Matryoshka-trained, the collection's PCA rotation is refitted when its chunk count
changed (also after a killed run, whose rotation would be stale).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ripelm.runtime.retrieval.chunking import Chunk, chunk_blocks
from ripelm.runtime.retrieval.dense_index import fit_rotation
from ripelm.runtime.retrieval.embedder import Embedder
from ripelm.runtime.retrieval.errors import EmbedderMismatchError, SkipFile
from ripelm.runtime.retrieval.loaders import SUPPORTED, load, read_bytes
from ripelm.runtime.retrieval.store import Collection, Store

IGNORED_DIRS = {
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    "__pycache__",
    ".venv",
    "venv",
    ".tox",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "site-packages",
    "dist",
    "build",
    ".idea",
    ".vscode",
}
EMBED_BATCH = 64  # chunks gathered (from one or more documents) before an embedding call


@dataclass
class IndexReport:
    files: int = 0  # files considered (supported types)
    indexed: int = 0  # documents (re-)embedded
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks_added: int = 0
    chunks_total: int = 0
    tokens: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0  # stat, read, hash, parse, chunk
    embed_seconds: float = 0.0
    embed_cpu_seconds: float = 0.0  # process CPU time spent embedding (all threads): contention-proof
    write_seconds: float = 0.0
    rotation_seconds: float = 0.0


@dataclass
class Progress:
    done: int
    total: int
    path: str
    chunks: int


@dataclass
class _Pending:
    path: Path
    digest: str
    size: int
    mtime: float
    kind: str
    chunks: list[Chunk]


def walk(paths: Iterable[Path], report: IndexReport) -> tuple[list[Path], list[Path]]:
    """(files to consider, the roots they came from). Unsupported files inside folders are passed over
    silently; a named file of an unsupported type, or a missing path, is reported as skipped."""
    files: list[Path] = []
    roots: list[Path] = []
    for p in paths:
        p = Path(p).expanduser().absolute()
        if p.is_dir():
            roots.append(p)
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS and not d.startswith("."))
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    if f.suffix.lower() in SUPPORTED and not name.startswith("."):
                        files.append(f)
        elif p.is_file():
            roots.append(p)
            if p.suffix.lower() in SUPPORTED:
                files.append(p)
            else:
                report.skipped.append((str(p), f"unsupported file type '{p.suffix or p.name}'"))
        else:
            report.skipped.append((str(p), "no such file or folder"))
    return files, roots


def _under(path: str, roots: list[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + os.sep) for r in roots)


def embed_text(chunk: Chunk) -> str:
    """What is embedded: the chunk, led by its section heading when the chunk does not start with it."""
    if chunk.heading and not chunk.text.startswith(chunk.heading):
        return f"{chunk.heading}\n{chunk.text}"
    return chunk.text


class Indexer:
    def __init__(
        self,
        store: Store,
        collection: Collection,
        embedder: Embedder,
        progress: Callable[[Progress], None] | None = None,
    ):
        if embedder.info.fingerprint != collection.fingerprint:
            raise EmbedderMismatchError(
                f"collection '{collection.name}' was built with {collection.embedder}, not "
                f"{embedder.info.name}; rebuild it (ripe index --rebuild) to re-embed everything"
            )
        self.store = store
        self.collection = collection
        self.embedder = embedder
        self.progress = progress

    def run(self, paths: Iterable[Path]) -> IndexReport:
        t0 = time.perf_counter()
        report = IndexReport()
        files, roots = walk(paths, report)
        report.files = len(files)
        known = self.store.documents(self.collection)
        seen: set[str] = set()
        pending: list[_Pending] = []
        inflight: tuple[list[_Pending], Future] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="index-embed") as pool:
            for n, f in enumerate(files, start=1):
                key = str(f)
                seen.add(key)
                t = time.perf_counter()
                item = self._prepare(f, known.get(key), report)
                report.read_seconds += time.perf_counter() - t
                if item is not None:
                    pending.append(item)
                    if sum(len(p.chunks) for p in pending) >= EMBED_BATCH:
                        # queue this batch behind the one embedding now, then write that one
                        nxt = (pending, pool.submit(self._embed, pending))
                        if inflight is not None:
                            self._write(*inflight, report)
                        inflight, pending = nxt, []
                if self.progress:
                    self.progress(Progress(n, len(files), key, report.chunks_added))
            last = (pending, pool.submit(self._embed, pending)) if pending else None
            for batch in (inflight, last):
                if batch is not None:
                    self._write(*batch, report)
        t = time.perf_counter()
        for key in known:
            if key not in seen and _under(key, roots):
                self.store.delete_document(self.collection, key)
                report.removed += 1
        report.write_seconds += time.perf_counter() - t
        self._refit_rotation(report)
        self.store.touch(self.collection)
        report.chunks_total = self.store.chunk_count(self.collection)
        report.seconds = time.perf_counter() - t0
        return report

    def _prepare(self, f: Path, old, report: IndexReport) -> _Pending | None:
        key = str(f)
        try:
            st = f.stat()
            if old is not None and old.size == st.st_size and old.mtime == st.st_mtime:
                report.unchanged += 1
                return None
            data = read_bytes(f)
            digest = hashlib.sha256(data).hexdigest()
            if old is not None and old.content_hash == digest:
                self.store.update_stat(self.collection, key, st.st_size, st.st_mtime)
                report.unchanged += 1
                return None
            loaded = load(f, data)
            chunks = chunk_blocks(loaded.blocks, self.collection.chunk_size, self.collection.chunk_overlap)
            if not chunks:
                raise SkipFile("no text")
        except SkipFile as e:
            report.skipped.append((key, str(e)))
            if old is not None:  # it was indexed before and cannot be read now: drop the stale copy
                self.store.delete_document(self.collection, key)
                report.removed += 1
            return None
        except OSError as e:
            report.skipped.append((key, f"unreadable ({e.strerror or e})"))
            return None
        return _Pending(f, digest, st.st_size, st.st_mtime, loaded.kind, chunks)

    def _embed(self, pending: list[_Pending]):
        """(vectors, wall seconds, CPU seconds, tokens) of a batch; runs on the embedding thread."""
        texts = [embed_text(c) for p in pending for c in p.chunks]
        t, cpu = time.perf_counter(), time.process_time()
        before = self.embedder.tokens_embedded
        vectors = self.embedder.embed(texts)
        tokens = self.embedder.tokens_embedded - before
        return vectors, time.perf_counter() - t, time.process_time() - cpu, tokens

    def _write(self, pending: list[_Pending], fut: Future, report: IndexReport) -> None:
        """Wait for a batch's vectors and write its documents, one transaction each."""
        vectors, secs, cpu, tokens = fut.result()
        report.tokens += tokens
        report.embed_seconds += secs
        report.embed_cpu_seconds += cpu
        t = time.perf_counter()
        at = 0
        for p in pending:
            n = len(p.chunks)
            self.store.write_document(
                self.collection,
                str(p.path),
                content_hash=p.digest,
                size=p.size,
                mtime=p.mtime,
                kind=p.kind,
                chunks=p.chunks,
                vectors=vectors[at : at + n],
            )
            at += n
            report.indexed += 1
            report.chunks_added += n
        report.write_seconds += time.perf_counter() - t

    def _refit_rotation(self, report: IndexReport) -> None:
        c = self.store.get_collection(self.collection.name)
        if c.matryoshka:
            return
        n = self.store.chunk_count(c)
        if n == c.rotation_chunks and (c.rotation is not None or n == 0):
            return
        t = time.perf_counter()
        if n < 2:
            self.store.set_rotation(c, None, None, n)
        else:
            _, vecs = self.store.vectors(c)
            rot, mean = fit_rotation(vecs)
            self.store.set_rotation(c, rot, mean, n)
        self.collection = self.store.get_collection(c.name)
        report.rotation_seconds = time.perf_counter() - t
