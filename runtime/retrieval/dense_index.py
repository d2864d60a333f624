"""Dense search over one collection's vectors: Matryoshka shortlist at a short prefix, rerank at full size.

Stored vectors stay as the embedder made them (unit length, full dimension). Search works in a
"prefix space": ``(v - mean) @ R``, where ``R`` is orthogonal. For a Matryoshka-trained embedder R is the
identity and the mean zero, so a prefix is the model's own truncated embedding. For any other embedder,
R holds the collection's principal directions (PCA, fitted at index time and stored with the collection),
so the first k coordinates keep the most variance a k-dim linear view can. Subtracting the mean shifts
every document's score for a query by the same amount, so rankings are unaffected, and R being orthogonal
means full-dimension scores are unchanged: only truncated prefixes differ.

Shortlist: cosine between the re-normalized first ``dim`` coordinates of query and documents (a
contiguous float32 copy of just those columns is kept, so the scan reads ``dim`` numbers per chunk).
Rerank: exact dot product of the unit full vectors for the shortlisted rows only.

At scale (more than ``EXACT_MAX`` chunks) the default shortlist is the quantized prefix codes of
prefix_codes instead: an int8 scan of the rotated prefix (see ``code_plan``), and the full vectors are
float16 rows of the memory-mapped vector file (vector_file), of which only the shortlisted rows are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ripelm.runtime.retrieval.prefix_codes import PrefixCodes, f16_dots

PCA_SAMPLE = 50_000  # chunks a rotation is fitted on at most


def fit_rotation(vectors: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(R, mean): R's columns are the principal directions of ``vectors``, largest variance first."""
    x = np.asarray(vectors, dtype=np.float32)
    if len(x) > PCA_SAMPLE:
        x = x[np.random.default_rng(seed).choice(len(x), PCA_SAMPLE, replace=False)]
    mean = x.mean(axis=0)
    xc = (x - mean).astype(np.float64)
    cov = xc.T @ xc / max(1, len(xc) - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    r = evecs[:, order].astype(np.float32)
    # a deterministic sign per direction, so refits of the same data give the same matrix
    r *= np.where(r[np.abs(r).argmax(axis=0), np.arange(r.shape[1])] < 0, -1.0, 1.0).astype(np.float32)
    return r, mean.astype(np.float32)


def shortlist_dim(n: int, dim: int) -> int:
    """Prefix length by collection size: exact scan while it is cheap, 1/8 of the vector at scale."""
    if n <= 5_000:
        return dim
    if n <= 20_000:
        return max(16, dim // 4)
    return max(16, dim // 8)


def shortlist_size(n: int, top_k: int) -> int:
    """Rows kept for the full rerank: 1% of the collection, at least 200 (recall@10 >= 0.99 at 1/8 of
    MiniLM's dimension on 100k vectors, see ``ripe retrieval-bench``)."""
    return min(n, max(20 * top_k, 200, n // 100))


EXACT_MAX = 20_000
CODE_DIM = 64
CODE_SHORTLIST_MIN = 1000
CODE_SHORTLIST_FRACTION = 0.003  # up to this many chunks a full float32 scan is cheaper than any shortlist


def code_plan(n: int, dim: int, top_k: int) -> tuple[int, int]:
    """(code prefix length, shortlist size) for int8 codes: 64 dims; 1,000 rows up to 333k chunks, then
    0.3%. Measured on vectors sampled like MiniLM's (``ripe retrieval-bench``, 200 queries), recall@10 of
    exact search: 100k chunks 0.9975 at 1,000; 1M chunks 0.9895 at 1,000, 0.995 at 2,000, 0.9975 at
    3,000 (the rerank of 3,000 float16 rows costs a fraction of the code scan)."""
    d = min(dim, CODE_DIM)
    return d, min(n, max(CODE_SHORTLIST_MIN, 20 * top_k, int(n * CODE_SHORTLIST_FRACTION)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class DenseIndex:
    ids: np.ndarray  # (n,) chunk ids
    full: np.ndarray  # (n, dim) float32 unit vectors
    rotation: np.ndarray | None = None
    mean: np.ndarray | None = None
    codes: PrefixCodes | None = None  # quantized prefixes made with ``code_mean`` and ``rotation``

    def __post_init__(self) -> None:
        if self.full.dtype != np.float16 or len(self.full) <= EXACT_MAX:
            self.full = np.ascontiguousarray(self.full, dtype=np.float32)  # small, or given as float32
        self._prefix_cache: dict[int, np.ndarray] = {}
        self._sorted_ids = bool(len(self.ids) < 2 or np.all(np.diff(self.ids) > 0))
        if not self._sorted_ids:
            self._row_of = {int(i): k for k, i in enumerate(self.ids)}

    @property
    def dim(self) -> int:
        return int(self.full.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def to_prefix_space(self, x: np.ndarray, d: int) -> np.ndarray:
        if self.rotation is None:
            return x[..., :d]
        centred = x - self.mean if self.mean is not None else x
        return centred @ self.rotation[:, :d]

    def prefixes(self, d: int) -> np.ndarray:
        """(n, d) re-normalized document prefixes; built once per length, in blocks to bound memory."""
        if d not in self._prefix_cache:
            out = np.empty((len(self), d), dtype=np.float32)
            for s in range(0, len(self), 16384):
                block = np.asarray(self.full[s : s + 16384], dtype=np.float32)
                out[s : s + 16384] = _unit(self.to_prefix_space(block, d))
            self._prefix_cache[d] = out
        return self._prefix_cache[d]

    def query_prefix(self, q: np.ndarray, d: int) -> np.ndarray:
        if self.rotation is None:
            return _unit(q[:d])
        return _unit(q @ self.rotation[:, :d])  # the mean shift is the same for every document: dropped

    def query_prefix_raw(self, q: np.ndarray, d: int) -> np.ndarray:
        """The query in the codes' prefix space, not re-normalized (codes estimate prefix dot products)."""
        return q[:d] if self.rotation is None else q @ self.rotation[:, :d]

    def shortlist(self, q: np.ndarray, d: int, k: int) -> np.ndarray:
        """Row numbers of the k best documents by prefix cosine (unordered)."""
        k = min(k, len(self))
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        scores = self.prefixes(d) @ self.query_prefix(q, d)
        if k >= len(scores):
            return np.arange(len(scores))
        return np.argpartition(-scores, k - 1)[:k]

    def full_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 full vectors of ``rows`` (only those rows are read from a memory-mapped file)."""
        return np.asarray(self.full[rows], dtype=np.float32)

    def rerank(self, q: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, full cosine) sorted best first."""
        rows = np.sort(rows)  # ascending rows: the pages of a memory map are read in file order
        scores = f16_dots(self.full, rows, q) if self.full.dtype == np.float16 else self.full[rows] @ q
        order = np.argsort(-scores, kind="stable")
        return rows[order], scores[order]

    def search(self, q: np.ndarray, top_k: int, *, d: int | None = None, k: int | None = None):
        """Shortlist at prefix ``d`` then rerank: (chunk ids, cosine) best first."""
        if d is None and self.codes is not None and len(self) > EXACT_MAX:
            cd, ck = code_plan(len(self), self.dim, top_k)
            rows = self.codes.shortlist(self.query_prefix_raw(q, self.codes.d), k or ck)
            rows, scores = self.rerank(q, rows)
            return self.ids[rows[:top_k]], scores[:top_k]
        d = d or shortlist_dim(len(self), self.dim)
        rows = self.shortlist(q, d, k or shortlist_size(len(self), top_k))
        rows, scores = self.rerank(q, rows)
        return self.ids[rows[:top_k]], scores[:top_k]

    def exact(self, q: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.full.dtype == np.float32:
            scores = self.full @ q
        else:
            scores = np.empty(len(self), dtype=np.float32)
            for s in range(0, len(self), 65536):
                scores[s : s + 65536] = self.full_rows(slice(s, s + 65536)) @ q
        top_k = min(top_k, len(scores))
        rows = np.argpartition(-scores, top_k - 1)[:top_k] if top_k < len(scores) else np.arange(len(scores))
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        return self.ids[rows], scores[rows]

    def scores_for(self, q: np.ndarray, chunk_ids: list[int]) -> np.ndarray:
        if self._sorted_ids:
            rows = np.searchsorted(self.ids, np.asarray(chunk_ids, dtype=np.int64))
        else:
            rows = np.array([self._row_of[int(i)] for i in chunk_ids], dtype=np.int64)
        if not len(rows):
            return np.zeros(0, dtype=np.float32)
        return f16_dots(self.full, rows, q) if self.full.dtype == np.float16 else self.full[rows] @ q
