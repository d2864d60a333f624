"""Matryoshka search at scale: shortlist at a short prefix + full rerank against exact full-dimension search.

A store of ``n`` vectors is sampled to match real embeddings: the mean and covariance of a set of real
chunk vectors define a Gaussian, samples are drawn from it and L2-normalized like the embedder's output
(so the spectrum the PCA rotation sees is the real one). Queries are real query embeddings, topped up with
held-out samples. Recall@10 is the mean overlap of the shortlist+rerank top 10 with the exact top 10;
latencies are per-query medians of the same in-memory float32 matrix scanned both ways.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ripelm.runtime.retrieval.dense_index import DenseIndex, fit_rotation


@dataclass
class ScaleResult:
    n: int
    dim: int
    prefix_dim: int
    shortlist: int
    queries: int
    recall_at_10: float
    exact_ms: float  # median per query
    shortlist_ms: float
    speedup: float
    pca: bool


def sample_like(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors from a Gaussian with the mean and covariance of ``real`` (rows: unit vectors)."""
    x = np.asarray(real, dtype=np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    # a little shrinkage keeps the covariance positive definite when there are fewer samples than dims
    cov = 0.95 * cov + 0.05 * np.eye(x.shape[1]) * np.trace(cov) / x.shape[1]
    rng = np.random.default_rng(seed)
    out = rng.multivariate_normal(mean, cov, size=n, method="cholesky").astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def run_scale(
    real: np.ndarray,
    queries: np.ndarray,
    *,
    n: int = 100_000,
    prefix_dim: int | None = None,
    shortlists: tuple[int, ...] = (200, 500, 1000, 2000),
    n_queries: int = 200,
    pca: bool = True,
    seed: int = 0,
) -> list[ScaleResult]:
    """One result per shortlist size; the exact search is timed once per query and shared."""
    dim = real.shape[1]
    d = prefix_dim or dim // 8
    store = sample_like(real, n + max(0, n_queries - len(queries)), seed)
    extra = store[n:]
    store = store[:n]
    q = np.concatenate([queries, extra])[:n_queries].astype(np.float32)
    rot, mean = fit_rotation(store, seed=seed) if pca else (None, None)
    idx = DenseIndex(np.arange(n), store, rot, mean)
    idx.prefixes(d)  # built once, like the in-memory matrix a Searcher keeps
    exact_t: list[float] = []
    short_t: dict[int, list[float]] = {k: [] for k in shortlists}
    overlap: dict[int, list[float]] = {k: [] for k in shortlists}
    for qv in q:
        t = time.perf_counter()
        exact_ids, _ = idx.exact(qv, 10)
        exact_t.append(time.perf_counter() - t)
        truth = set(exact_ids.tolist())
        for k in shortlists:
            t = time.perf_counter()
            ids, _ = idx.search(qv, 10, d=d, k=k)
            short_t[k].append(time.perf_counter() - t)
            overlap[k].append(len(truth & set(ids.tolist())) / 10)
    e = float(np.median(exact_t))
    out = []
    for k in shortlists:
        s = float(np.median(short_t[k]))
        out.append(
            ScaleResult(n, dim, d, k, len(q), float(np.mean(overlap[k])), e * 1e3, s * 1e3, e / s, pca)
        )
    return out
