"""The scalable shortlist: native int8 / binary code scans and top-k selection against numpy, recall of
the code shortlist + float16 rerank against exact search, and the memory-mapped vector file kept beside
the SQLite store (built on first search, rebuilt when missing, damaged or stale)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from ripelm.runtime.retrieval.chunking import Chunk
from ripelm.runtime.retrieval.dense_index import EXACT_MAX, DenseIndex, code_plan, fit_rotation
from ripelm.runtime.retrieval.prefix_codes import PrefixCodes, _lib, encode, fit_scale
from ripelm.runtime.retrieval.search import Searcher
from ripelm.runtime.retrieval.store import Store
from ripelm.runtime.retrieval.vector_file import open_vectors, sidecar_path

DIM = 384


def spectrum_vectors(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors with a decaying spectrum and a common mean, like sentence embeddings."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    x = rng.standard_normal((n, DIM)).astype(np.float32) * (1.0 / np.sqrt(1 + np.arange(DIM)))
    x = x @ basis.T.astype(np.float32) + 0.3 * basis[:, 0].astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_native_scan_and_selection_match_numpy():
    if _lib() is None:
        pytest.skip("the native library is not built")
    rng = np.random.default_rng(1)
    for kind, d in (("int8", 64), ("int8", 96), ("int8", 40), ("bits", 128), ("bits", 256)):
        x = rng.standard_normal((5003, d)).astype(np.float32)
        scale = fit_scale(x)
        codes = PrefixCodes(kind, d, encode(x, kind, scale), scale)
        q = rng.standard_normal(d).astype(np.float32)
        qc = codes.query_code(q)
        if kind == "int8":
            scores = codes.codes.astype(np.int64) @ qc.astype(np.int64)
        else:
            bits = np.unpackbits(codes.codes, axis=1, bitorder="little")
            scores = (bits == np.unpackbits(qc, bitorder="little")).sum(axis=1)
        for k in (1, 10, 500, 5003, 9000):
            native = codes.shortlist(q, k)
            numpy_rows = codes.shortlist(q, k, native=False)
            assert len(native) == len(numpy_rows) == min(k, 5003), (kind, d, k)
            assert len(set(native.tolist())) == len(native)
            # a correct top-k: nothing left out scores above anything taken (ties may go either way)
            rest = np.setdiff1d(np.arange(5003), native)
            if len(rest):
                assert scores[native].min() >= scores[rest].max(), (kind, d, k)
            assert sorted(scores[native].tolist()) == sorted(scores[numpy_rows].tolist())


def test_code_shortlist_recall_against_exact_search():
    n = EXACT_MAX + 10_000
    vecs = spectrum_vectors(n + 50)
    store, queries = vecs[:n], vecs[n:]
    rot, mean = fit_rotation(store)
    d, k = code_plan(n, DIM, 10)
    prefix = (store - mean) @ rot[:, :d]
    scale = fit_scale(prefix)
    idx = DenseIndex(
        np.arange(n) * 3 + 7,
        store.astype(np.float16),
        rot,
        mean,
        codes=PrefixCodes("int8", d, encode(prefix, "int8", scale), scale),
    )
    assert idx.full.dtype == np.float16  # at scale the rerank reads float16 rows, no float32 copy
    exact = DenseIndex(np.arange(n) * 3 + 7, store)
    recall = []
    for q in queries:
        got, scores = idx.search(q, 10)
        want, _ = exact.exact(q, 10)
        recall.append(len(set(got.tolist()) & set(want.tolist())) / 10)
        assert np.all(np.diff(scores) <= 1e-6)  # best first
        np.testing.assert_allclose(idx.scores_for(q, got.tolist()), scores, atol=1e-6)
    assert np.mean(recall) >= 0.99


def fill(st: Store, c, n_docs: int, per_doc: int, seed: int = 0) -> None:
    vecs = spectrum_vectors(n_docs * per_doc, seed)
    for i in range(n_docs):
        chunks = [Chunk(f"doc {i} part {j}", 1, 1, None, None) for j in range(per_doc)]
        st.write_document(
            c,
            f"/docs/d{i}.txt",
            content_hash=f"h{i}-{seed}",
            size=1,
            mtime=1.0,
            kind="text",
            chunks=chunks,
            vectors=vecs[i * per_doc : (i + 1) * per_doc],
        )


def new(st: Store, name: str = "v", matryoshka: bool = True):
    return st.create_collection(
        name,
        embedder="test",
        embedder_path="-",
        fingerprint="fp",
        dim=DIM,
        matryoshka=matryoshka,
        chunk_size=800,
        chunk_overlap=0,
    )


def test_vector_file_is_built_reused_and_rebuilt_when_stale(tmp_path):
    st = Store(tmp_path / "r.db")
    c = new(st)
    fill(st, c, 30, 10)
    path = sidecar_path(st, c)
    assert not path.exists()
    vf = open_vectors(st, c, "int8", 64)
    assert path.exists() and vf.path == path and len(vf.ids) == 300
    ids, vecs = st.vectors(c)
    np.testing.assert_array_equal(vf.ids, ids)
    np.testing.assert_array_equal(np.asarray(vf.full), vecs)  # float16, bit for bit
    mtime = path.stat().st_mtime_ns
    again = open_vectors(st, c, "int8", 64)
    assert path.stat().st_mtime_ns == mtime and isinstance(again.full, np.memmap)  # reused, mapped
    # an edit of the last document keeps the row count and may reuse its ids: still detected
    new_vecs = spectrum_vectors(10, seed=9)
    chunks = [Chunk(f"edited {j}", 1, 1, None, None) for j in range(10)]
    st.write_document(
        c, "/docs/d29.txt", content_hash="x", size=1, mtime=2.0, kind="text", chunks=chunks, vectors=new_vecs
    )
    edited = open_vectors(st, c, "int8", 64)
    assert len(edited.ids) == 300
    np.testing.assert_array_equal(np.asarray(edited.full[-10:]), new_vecs.astype(np.float16))
    st.delete_document(c, "/docs/d0.txt")
    assert len(open_vectors(st, c, "int8", 64).ids) == 290
    # a damaged file (cut short, or garbage) is rebuilt, never read
    with open(path, "r+b") as f:
        f.truncate(5000)
    assert len(open_vectors(st, c, "int8", 64).ids) == 290
    path.write_bytes(b"garbage" * 100)
    assert len(open_vectors(st, c, "int8", 64).ids) == 290
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind
    # a build killed mid-way leaves its temporary file: the next build sweeps it once it is old
    killed = tmp_path / f"{path.name}.abc123.tmp"
    killed.write_bytes(b"half a file")
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    path.unlink()
    assert len(open_vectors(st, c, "int8", 64).ids) == 290 and not killed.exists()
    st.remove_collection("v")
    assert not path.exists()
    empty = new(st, "e")
    assert len(open_vectors(st, empty, "int8", 64).ids) == 0 and sidecar_path(st, empty).exists()
    assert len(open_vectors(st, empty, "int8", 64).full) == 0  # read back from the file
    assert Searcher(st, empty, None).search("q", q=np.ones(DIM, np.float32) / DIM**0.5, mode="dense") == []
    st.close()


def test_searcher_uses_the_codes_at_scale_and_agrees_with_exact(tmp_path):
    st = Store(tmp_path / "s.db")
    c = new(st, matryoshka=False)  # like MiniLM: the collection's PCA rotation orders the prefix
    fill(st, c, 110, 200)  # 22,000 chunks: past EXACT_MAX, so the int8 code shortlist runs
    rot, mean = fit_rotation(st.vectors(c)[1].astype(np.float32))
    st.set_rotation(c, rot, mean, st.chunk_count(c))
    s = Searcher(st, st.get_collection("v"), None)
    idx = s.index
    assert idx.codes is not None and len(idx) > EXACT_MAX and sidecar_path(st, c).exists()
    queries = spectrum_vectors(22_020)[22_000:]  # held out from the same distribution
    agree = 0
    for q in queries:
        dense = s.search("q", mode="dense", top_k=10, q=q)
        short = s.search("q", mode="matryoshka", top_k=10, q=q)
        agree += len({h.chunk.id for h in dense} & {h.chunk.id for h in short})
        assert short[0].chunk.text.startswith("doc ")
    assert agree / (10 * len(queries)) >= 0.99
    st.close()


def test_float16_rerank_reads_the_chosen_rows():
    from ripelm.runtime.retrieval.prefix_codes import f16_dots

    rng = np.random.default_rng(3)
    for dim in (384, 100, 7):  # the vector loop, its tail, and a row shorter than one vector
        full = rng.standard_normal((2000, dim)).astype(np.float16)
        full[0, :3] = [np.float16(6e-8), np.float16(-0.0), np.float16(65504)]  # subnormal, -0, largest
        rows = rng.choice(2000, 300, replace=False)
        rows[0] = 0
        q = rng.standard_normal(dim).astype(np.float32)
        want = full[rows].astype(np.float64) @ q.astype(np.float64)
        np.testing.assert_allclose(f16_dots(full, rows, q), want, rtol=1e-4, atol=1e-2)


def test_scale_bench_reports_recall_latency_bandwidth_and_memory():
    from ripelm.bench.retrieval_scale import memory_bandwidth, run_scale

    real = spectrum_vectors(600, seed=2)
    results = run_scale(real[:500], real[500:520], n=25_000, shortlists=(1000, 3000), n_queries=30)
    assert [r.shortlist for r in results] == [1000, 3000]
    for r in results:
        assert r.n == 25_000 and r.prefix_dim == 64 and r.queries == 30
        assert r.index_mb == pytest.approx(25_000 * (64 + 8) / 1e6)  # int8 codes + ids
        assert r.full_mb == pytest.approx(25_000 * DIM * 2 / 1e6)  # float16
        assert (
            r.exact_ms > 0 and r.shortlist_ms > 0 and r.speedup == pytest.approx(r.exact_ms / r.shortlist_ms)
        )
        assert r.exact_gbps == pytest.approx(25_000 * DIM * 4 / (r.exact_ms / 1e3) / 1e9)
    assert results[0].recall_at_10 >= 0.95 and results[1].recall_at_10 >= results[0].recall_at_10 - 0.01
    assert memory_bandwidth(mb=64, repeats=2) > 0.1
