"""Matryoshka search at scale: int8 prefix-code shortlist + float16 full rerank against exact float32 search.

A store of ``n`` vectors is sampled to match real embeddings: the mean and covariance of a set of real
chunk vectors define a Gaussian, samples are drawn from it and L2-normalized like the embedder's output
(so the spectrum the PCA rotation sees is the real one). Queries are real query embeddings, topped up with
held-out samples. Recall@10 is the mean overlap of the shortlist+rerank top 10 with the exact top 10 of a
full-dimension float32 scan; latencies are per-query medians. The shortlist side is what a Searcher runs:
the codes and float16 full vectors a collection's vector file holds (here in memory: once its pages are
cached a memory map reads the same bytes), the native scan, and a rerank of the shortlisted rows only.

The exact side is judged against the machine's memory bandwidth, measured here as a one-thread numpy
copy of a buffer far larger than the caches (bytes read plus bytes written, per second).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ripelm.runtime.retrieval.dense_index import DenseIndex, fit_rotation
from ripelm.runtime.retrieval.prefix_codes import PrefixCodes, encode, fit_scale


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
    exact_gbps: float  # bytes of the float32 store per exact query time
    index_mb: float  # the codes and ids the shortlist scans
    full_mb: float  # float16 full vectors (memory-mapped; only shortlisted rows are read per query)


def sample_like(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors from a Gaussian with the mean and covariance of ``real`` (rows: unit vectors)."""
    x = np.asarray(real, dtype=np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    # a little shrinkage keeps the covariance positive definite when there are fewer samples than dims
    cov = 0.95 * cov + 0.05 * np.eye(x.shape[1]) * np.trace(cov) / x.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty((n, x.shape[1]), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks: a million float64 samples would need 3 GB at once
        m = min(100_000, n - s)
        out[s : s + m] = rng.multivariate_normal(mean, cov, size=m, method="cholesky")
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a one-thread copy of an ``mb`` MB buffer (read + write), best of ``repeats``."""
    src = np.ones(mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def run_scale(
    real: np.ndarray,
    queries: np.ndarray,
    *,
    n: int = 100_000,
    prefix_dim: int | None = None,
    shortlists: tuple[int, ...] = (1000, 2000, 3000),
    n_queries: int = 200,
    pca: bool = True,
    seed: int = 0,
) -> list[ScaleResult]:
    """One result per shortlist size; the exact search is timed once per query and shared."""
    dim = real.shape[1]
    d = prefix_dim or min(dim, 64)
    store = sample_like(real, n + max(0, n_queries - len(queries)), seed)
    extra = store[n:]
    store = store[:n]
    q = np.concatenate([queries, extra])[:n_queries].astype(np.float32)
    rot, mean = fit_rotation(store, seed=seed) if pca else (None, store.mean(axis=0))
    exact_idx = DenseIndex(np.arange(n), store)  # float32, the baseline
    prefix = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        block = store[s : s + 65536] - mean
        prefix[s : s + 65536] = block[:, :d] if rot is None else block @ rot[:, :d]
    scale = fit_scale(prefix, seed)
    codes = PrefixCodes("int8", d, encode(prefix, "int8", scale), scale)
    del prefix
    full16 = store.astype(np.float16)
    idx = DenseIndex(np.arange(n), full16, rot, mean if rot is not None else None, codes=codes)
    exact_t: list[float] = []
    short_t: dict[int, list[float]] = {k: [] for k in shortlists}
    overlap: dict[int, list[float]] = {k: [] for k in shortlists}
    for qv in q:
        t = time.perf_counter()
        exact_ids, _ = exact_idx.exact(qv, 10)
        exact_t.append(time.perf_counter() - t)
        truth = set(exact_ids.tolist())
        for k in shortlists:
            t = time.perf_counter()
            rows = codes.shortlist(idx.query_prefix_raw(qv, d), k)
            rows, _ = idx.rerank(qv, rows)
            ids = rows[:10]
            short_t[k].append(time.perf_counter() - t)
            overlap[k].append(len(truth & set(ids.tolist())) / 10)
    e = float(np.median(exact_t))
    index_mb = (codes.nbytes + 8 * n) / 1e6
    out = []
    for k in shortlists:
        s = float(np.median(short_t[k]))
        out.append(
            ScaleResult(
                n,
                dim,
                d,
                k,
                len(q),
                float(np.mean(overlap[k])),
                e * 1e3,
                s * 1e3,
                e / s,
                pca,
                store.nbytes / e / 1e9,
                index_mb,
                full16.nbytes / 1e6,
            )
        )
    return out
