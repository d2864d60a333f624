"""Indexing into the SQLite store: incremental by content hash (checked on counts), deletions, embedder
changes, and a real SIGKILL of the indexer process mid-run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from retrieval_helpers import embedder_gguf, make_home

from ripelm.runtime.retrieval.embedder import Embedder
from ripelm.runtime.retrieval.errors import EmbedderMismatchError
from ripelm.runtime.retrieval.indexer import Indexer
from ripelm.runtime.retrieval.search import Searcher
from ripelm.runtime.retrieval.store import Store

TOPICS = [
    "paged attention blocks",
    "speculative decoding drafts",
    "matryoshka embeddings prefixes",
    "knowledge distillation temperature",
    "quantization of weights to four bits",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def embedder(home):
    e = Embedder(embedder_gguf(home), name="all-minilm:l6-v2")
    yield e
    e.close()


def write_tree(root: Path, n: int) -> list[Path]:
    files = []
    for i in range(n):
        p = root / f"sub{i % 3}" / f"note{i:03d}.md"
        p.parent.mkdir(parents=True, exist_ok=True)
        topic = TOPICS[i % len(TOPICS)]
        p.write_text(f"# Note {i}\n\nThis note {i} is about {topic}. " + f"Detail {i} on {topic}. " * 3)
        files.append(p)
    return files


def new_collection(store: Store, embedder: Embedder, name: str = "c"):
    i = embedder.info
    return store.create_collection(
        name,
        embedder=i.name,
        embedder_path=str(embedder.path),
        fingerprint=i.fingerprint,
        dim=i.dim,
        matryoshka=i.matryoshka,
        chunk_size=800,
        chunk_overlap=120,
    )


def consistent(db: Path) -> tuple[int, int]:
    """Checks the store's invariants; returns (documents, chunks)."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        docs = con.execute("SELECT id, n_chunks FROM documents").fetchall()
        for doc_id, n in docs:
            assert (
                con.execute("SELECT count(*) FROM chunks WHERE document_id = ?", [doc_id]).fetchone()[0] == n
            )
        orphans = con.execute(
            "SELECT count(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)"
        )
        assert orphans.fetchone()[0] == 0
        chunks = con.execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert con.execute("SELECT count(*) FROM chunks_fts").fetchone()[0] == chunks
        return len(docs), chunks
    finally:
        con.close()


def test_incremental_reindex_counts(tmp_path, embedder):
    root = tmp_path / "tree"
    files = write_tree(root, 12)
    with Store(tmp_path / "r.db") as st:
        c = new_collection(st, embedder)
        first = Indexer(st, c, embedder).run([root])
        assert (first.files, first.indexed, first.chunks_added) == (12, 12, 12)
        assert st.get_collection("c").rotation is not None  # MiniLM is not Matryoshka-trained: PCA stored

        again = Indexer(st, c, embedder).run([root])
        assert (again.indexed, again.unchanged, again.chunks_added) == (0, 12, 0)

        files[4].write_text(files[4].read_text() + "\n\nA new paragraph about flash attention tiles.\n")
        os.utime(files[5], (1, 1))  # touched, same bytes: re-hashed, not re-embedded
        before = embedder.tokens_embedded
        edit = Indexer(st, c, embedder).run([root])
        assert (edit.indexed, edit.unchanged, edit.chunks_added) == (1, 11, 1)
        assert embedder.tokens_embedded > before

        files[7].unlink()
        gone = Indexer(st, c, embedder).run([root])
        assert (gone.removed, gone.chunks_total) == (1, 11)
        assert str(files[7]) not in st.documents(c)
        # indexing another folder into the same collection does not delete the first one's files
        other = tmp_path / "other"
        write_tree(other, 2)
        more = Indexer(st, c, embedder).run([other])
        assert (more.indexed, more.removed, more.chunks_total) == (2, 0, 13)
    assert consistent(tmp_path / "r.db") == (13, 13)


def test_search_modes_and_locations(tmp_path, embedder):
    root = tmp_path / "tree"
    write_tree(root, 10)
    with Store(tmp_path / "s.db") as st:
        c = new_collection(st, embedder)
        Indexer(st, c, embedder).run([root])
        s = Searcher(st, st.get_collection("c"), embedder)
        for mode in ("bm25", "dense", "matryoshka", "hybrid"):
            hits = s.search("speculative decoding drafts", mode=mode, top_k=3)
            assert len(hits) == (2 if mode == "bm25" else 3), mode  # only 2 notes share those words
            assert "speculative" in hits[0].chunk.text, mode
            assert hits[0].where.endswith(":1-3") and Path(hits[0].chunk.path).is_file()
        paraphrase = s.search("a small model proposes guesses that a big one checks", mode="dense", top_k=2)
        assert "speculative" in paraphrase[0].chunk.text
        # shortlist at a short prefix + full rerank agrees with exact search on the top hit
        a = s.search("nested vector prefixes", mode="dense", top_k=1)
        b = s.search("nested vector prefixes", mode="matryoshka", top_k=1, dim=48, shortlist=5)
        assert a[0].chunk.id == b[0].chunk.id


def test_changed_embedder_needs_a_rebuild(tmp_path, embedder, home):
    root = tmp_path / "tree"
    write_tree(root, 3)
    with Store(tmp_path / "e.db") as st:
        c = new_collection(st, embedder)
        Indexer(st, c, embedder).run([root])
        st.db.execute("UPDATE collections SET fingerprint = 'another-model'")
        stale = st.get_collection("c")
        with pytest.raises(EmbedderMismatchError):
            Indexer(st, stale, embedder)
        with pytest.raises(EmbedderMismatchError):
            Searcher(st, stale, embedder)
        i = embedder.info
        rebuilt = st.clear(
            stale,
            embedder=i.name,
            embedder_path=str(embedder.path),
            fingerprint=i.fingerprint,
            dim=i.dim,
            matryoshka=i.matryoshka,
        )
        assert st.chunk_count(rebuilt) == 0 and st.documents(rebuilt) == {}
        assert Indexer(st, rebuilt, embedder).run([root]).indexed == 3


def test_rotation_is_orthogonal_and_keeps_full_scores(embedder):
    from ripelm.runtime.retrieval.dense_index import DenseIndex, fit_rotation

    vecs = embedder.embed([f"{t} number {i}" for i in range(8) for t in TOPICS])
    r, mean = fit_rotation(vecs)
    np.testing.assert_allclose(r.T @ r, np.eye(r.shape[0]), atol=1e-4)
    idx = DenseIndex(np.arange(len(vecs)), vecs, r, mean)
    q = embedder.embed_query("weights in four bits")
    np.testing.assert_allclose(idx.to_prefix_space(vecs, 384) @ (r.T @ q), (vecs - mean) @ q, atol=1e-4)
    ids, _ = idx.search(q, 5, d=384, k=len(vecs))
    exact, _ = idx.exact(q, 5)
    assert ids.tolist() == exact.tolist()


def test_sigkill_mid_run_leaves_a_consistent_store(tmp_path, home):
    root = tmp_path / "tree"
    write_tree(root, 160)
    run_home = tmp_path / "home"
    run_home.mkdir()
    os.symlink(home / "models", run_home / "models")
    db = run_home / "retrieval.db"
    env = dict(os.environ, RIPELM_HOME=str(run_home))
    cmd = [sys.executable, "-m", "ripelm.cli", "index", str(root), "--collection", "k", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    con = sqlite3.connect(db, timeout=5)
                    done = con.execute("SELECT count(*) FROM documents").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:
                    done = 0  # schema not created yet
            if done >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the indexer finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    docs, chunks = consistent(db)
    assert 1 <= docs < 160 and docs == chunks  # one chunk per note, no half-written document
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"{160 - docs} indexed, {docs} unchanged" in second.stdout
    assert consistent(db) == (160, 160)
    con = sqlite3.connect(db)
    assert con.execute("SELECT rotation_chunks FROM collections").fetchone()[0] == 160  # refitted
    con.close()


def test_pipelined_batches_store_each_chunk_with_its_own_vector(tmp_path, embedder, monkeypatch):
    """Embedding runs on its own thread, split across workers by length: every stored vector is still
    the one of its own chunk, across many batches of unequal texts."""
    from ripelm.runtime.retrieval import indexer
    from ripelm.runtime.retrieval.chunking import Chunk
    from ripelm.runtime.retrieval.embedder import balanced_parts
    from ripelm.runtime.retrieval.indexer import embed_text

    monkeypatch.setattr(indexer, "EMBED_BATCH", 12)  # many batches from a small tree

    parts = balanced_parts([900, 10, 10, 10, 10, 500, 400], 2)
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert {5, 6} <= set(next(p for p in parts if 0 not in p))  # the two middling ones against the long one
    root = tmp_path / "tree"
    for i in range(30):  # more than two batches; lengths from 1 line to several chunks
        topic = TOPICS[i % len(TOPICS)]
        (root / f"f{i:03d}.md").parent.mkdir(parents=True, exist_ok=True)
        body = "\n\n".join(
            f"Part {j} of file {i}: {topic}, detail {j}. " * (1 + i % 4) for j in range(1 + i % 9)
        )
        (root / f"f{i:03d}.md").write_text(f"# File {i}\n\n{body}\n")
    with Store(tmp_path / "p.db") as st:
        c = new_collection(st, embedder)
        rep = Indexer(st, c, embedder).run([root])
        assert rep.indexed == 30 and rep.chunks_added > 3 * 12
        ids, vecs = st.vectors(c)
        rows = st.chunks_by_id(ids.tolist())
        sample = list(range(0, len(ids), max(1, len(ids) // 40)))
        texts = [
            embed_text(Chunk(rows[int(ids[k])].text, 0, 0, None, rows[int(ids[k])].heading)) for k in sample
        ]
        want = embedder.embed(texts)
        got = vecs[sample].astype(np.float32)
        assert np.min(np.sum(want * got, axis=1)) > 0.999  # float16 storage; a mix-up would be far off
