"""Query -> ranked chunks of one collection: BM25, dense, Matryoshka shortlist + rerank, or hybrid.

Hybrid (the default) takes the Matryoshka shortlist reranked at full dimension and the FTS5 BM25 top
hits, scores every candidate of either list at full dimension, and fuses the two signals (see fusion).
The dense index is the collection's memory-mapped vector file (vector_file: quantized prefix codes and
float16 full vectors, rebuilt from SQLite when stale), opened once per Searcher.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ripelm.runtime.retrieval.dense_index import (
    CODE_DIM,
    EXACT_MAX,
    DenseIndex,
    code_plan,
    shortlist_dim,
    shortlist_size,
)
from ripelm.runtime.retrieval.embedder import Embedder
from ripelm.runtime.retrieval.errors import EmbedderMismatchError, RetrievalError
from ripelm.runtime.retrieval.fusion import FusionParams, fuse
from ripelm.runtime.retrieval.store import ChunkRow, Collection, Store
from ripelm.runtime.retrieval.vector_file import open_vectors

MODES = ("hybrid", "matryoshka", "dense", "bm25")
FUSION_DEPTH = 50  # candidates taken from each side before fusing


@dataclass
class Hit:
    chunk: ChunkRow
    score: float  # what the ranking used (fused, cosine, or BM25)
    dense: float | None = None  # full-dimension cosine
    bm25: float | None = None

    @property
    def where(self) -> str:
        """``path:12-30`` or ``path (p. 4, lines 3-9)``."""
        c = self.chunk
        lines = f"{c.line_start}" if c.line_start == c.line_end else f"{c.line_start}-{c.line_end}"
        if c.page is not None:
            return f"{c.path} (p. {c.page}, lines {lines})"
        return f"{c.path}:{lines}"


_WORD = re.compile(r"\w+", re.UNICODE)


def fts_query(text: str, max_terms: int = 32) -> str:
    """A safe FTS5 MATCH expression: the query's words, each quoted, OR-ed (BM25 weighs them by rarity)."""
    seen: list[str] = []
    for w in _WORD.findall(text.lower()):
        if w not in seen:
            seen.append(w)
    return " OR ".join(f'"{w}"' for w in seen[:max_terms])


def prepare_vectors(store: Store, collection: Collection):
    """The collection's memory-mapped vector file, (re)built now if stale: `ripe index` calls it so that
    the first search after indexing does not pay for the build."""
    return open_vectors(store, collection, "int8", min(collection.dim, CODE_DIM))


class Searcher:
    def __init__(self, store: Store, collection: Collection, embedder: Embedder | None):
        self.store = store
        self.collection = collection
        self.embedder = embedder
        if embedder is not None and embedder.info.fingerprint != collection.fingerprint:
            raise EmbedderMismatchError(
                f"collection '{collection.name}' was built with {collection.embedder}; "
                f"searching it with {embedder.info.name} would compare unrelated vectors"
            )
        self._index: DenseIndex | None = None

    @property
    def index(self) -> DenseIndex:
        if self._index is None:
            c = self.collection
            vf = prepare_vectors(self.store, c)
            rot = None if c.matryoshka else c.rotation
            self._index = DenseIndex(
                vf.ids, vf.full, rot, None if rot is None else c.rotation_mean, codes=vf.codes
            )
        return self._index

    def embed_query(self, query: str) -> np.ndarray:
        if self.embedder is None:
            raise RetrievalError("dense search needs the collection's embedder")
        return self.embedder.embed_query(query)

    def search(
        self,
        query: str,
        *,
        top_k: int = 5,
        mode: str = "hybrid",
        dim: int | None = None,
        fusion: FusionParams | None = None,
        q: np.ndarray | None = None,
        shortlist: int | None = None,
    ) -> list[Hit]:
        """Top ``top_k`` chunks. ``dim``: shortlist prefix length; ``shortlist``: how many rows the prefix
        scan keeps for the full-dimension rerank (both default by collection size); ``q``: the query
        vector, when the caller embedded it already."""
        if mode not in MODES:
            raise RetrievalError(f"unknown search mode '{mode}' (choose from {', '.join(MODES)})")
        if not query.strip():
            raise RetrievalError("the query is empty")
        if top_k < 1:
            raise RetrievalError("--top-k must be at least 1")
        if dim is not None and not 1 <= dim <= self.collection.dim:
            raise RetrievalError(f"--dim must be between 1 and {self.collection.dim}")
        if mode == "bm25":
            ranked = self.store.bm25(self.collection, fts_query(query), top_k)
            return self._hits([(i, s, None, s) for i, s in ranked])
        idx = self.index
        if len(idx) == 0:
            return []
        qv = q if q is not None else self.embed_query(query)
        if mode == "dense":
            ids, scores = idx.exact(qv, top_k)
            return self._hits([(int(i), float(s), float(s), None) for i, s in zip(ids, scores, strict=True)])
        depth = top_k if mode == "matryoshka" else max(top_k, FUSION_DEPTH)
        if dim is None and idx.codes is not None and len(idx) > EXACT_MAX:  # int8 codes at scale
            k = shortlist or code_plan(len(idx), idx.dim, depth)[1]
            ids, scores = idx.search(qv, depth, k=k)
        else:
            d = dim or shortlist_dim(len(idx), idx.dim)
            ids, scores = idx.search(qv, depth, d=d, k=shortlist or shortlist_size(len(idx), depth))
        if mode == "matryoshka":
            return self._hits([(int(i), float(s), float(s), None) for i, s in zip(ids, scores, strict=True)])
        dense = {int(i): float(s) for i, s in zip(ids, scores, strict=True)}
        bm25 = dict(self.store.bm25(self.collection, fts_query(query), max(top_k, FUSION_DEPTH)))
        missing = [i for i in bm25 if i not in dense]
        for i, s in zip(missing, idx.scores_for(qv, missing), strict=True):
            dense[i] = float(s)
        fused = fuse(dense, bm25, fusion or FusionParams())[:top_k]
        return self._hits([(i, s, dense.get(i), bm25.get(i)) for i, s in fused])

    def _hits(self, ranked: list[tuple[int, float, float | None, float | None]]) -> list[Hit]:
        rows = self.store.chunks_by_id([i for i, *_ in ranked])
        return [Hit(rows[i], s, d, b) for i, s, d, b in ranked if i in rows]
