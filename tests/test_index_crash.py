"""Crash safety of `ripe index`: SIGKILL it at random points, then check the store and finish the job.

After every kill: ``PRAGMA integrity_check`` is ok, the FTS index agrees with its table, and every stored
document is whole (its row's chunk count, its chunk rows and a reference run's chunks all agree: no
half-written document). After the last kill a normal run completes the job and the collection equals a
reference index of the same files. The default suite kills 10 times; ``pytest -m fuzz`` kills
RIPELM_KILLS times (default 100) and prints the figures.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from retrieval_helpers import make_home, ripe

WORDS = (
    "cache block table token draft model verify attention paged prefix hash sequence batch scheduler "
    "kernel quantize weight scale group matrix vector embedding search rank chunk index store"
).split()


def write_corpus(root: Path, n_files: int = 24, seed: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(n_files):
        paras = []
        for p in range(rng.randint(2, 6)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
            paras.append(f"Paragraph {p} of file {i}: {words}.")
        (root / f"doc{i:03d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(paras) + "\n")


def db_path(home: Path) -> Path:
    return home / "retrieval.db"


def snapshot(db: Path) -> dict[str, tuple[str, int]]:
    """{path: (content hash, chunk count)} of the collection, after checking the file is sound."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if (
            "meta" in tables) else None  # fmt: skip
        if version is None:
            # Killed while the store was being created: its schema is written idempotently and the next
            # open finishes it; nothing can have been indexed yet.
            if "documents" in tables:
                assert con.execute("SELECT count(*) FROM documents").fetchone()[0] == 0
            return {}
        con.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('integrity-check')")  # raises if out of step
        rows = con.execute(
            "SELECT d.path, d.content_hash, d.n_chunks, count(c.id) FROM documents d "
            "LEFT JOIN chunks c ON c.document_id = d.id GROUP BY d.id"
        ).fetchall()
        orphans = con.execute(
            "SELECT count(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)"
        ).fetchone()[0]
    finally:
        con.close()
    assert orphans == 0
    for path, _, n_chunks, found in rows:
        assert n_chunks == found > 0, (path, n_chunks, found)  # a document is all there or not at all
    return {path: (h, n) for path, h, n, _ in rows}


def index_cmd(docs: Path) -> list[str]:
    return [sys.executable, "-m", "ripelm.cli", "index", str(docs), "--collection", "crash", "--workers", "1"]


def kill_campaign(tmp_path: Path, kills: int, seed: int, n_files: int) -> dict:
    docs = tmp_path / "docs"
    docs.mkdir()
    write_corpus(docs, n_files)
    ref_home = make_home(tmp_path / "ref")
    t0 = time.perf_counter()
    done = ripe("index", str(docs), "--collection", "crash", "--workers", "1", home=ref_home)
    full_run = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    reference = snapshot(db_path(ref_home))
    assert len(reference) == n_files

    home = make_home(tmp_path / "home")
    env = dict(os.environ, RIPELM_HOME=str(home))
    rng = random.Random(seed)
    progress = []
    for _ in range(kills):
        proc = subprocess.Popen(
            index_cmd(docs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + rng.uniform(0.0, full_run * 1.2)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)  # the kill time itself is what is random here; this is not a wait for a state
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if not db_path(home).exists():
            progress.append(0)
            continue
        state = snapshot(db_path(home))
        for path, (h, n) in state.items():
            assert reference[path] == (h, n), path  # whole and identical to the reference
        progress.append(len(state))
        if len(state) == len(reference) and rng.random() < 0.5:  # keep some kills landing mid-job
            done = ripe("collections", "rm", "crash", home=home)
            assert done.returncode == 0, done.stderr
    done = ripe("index", str(docs), "--collection", "crash", "--workers", "1", home=home)
    assert done.returncode == 0, done.stderr
    assert snapshot(db_path(home)) == reference
    found = ripe("search", "paged attention", "--collection", "crash", home=home)
    assert found.returncode == 0 and "doc" in found.stdout, found.stderr
    return {
        "kills": kills,
        "full_run_s": round(full_run, 2),
        "mid_job_kills": sum(0 < p < len(reference) for p in progress),
        "before_first_document": sum(p == 0 for p in progress),
        "corrupt": 0,
        "half_written": 0,
    }


def test_sigkill_index_ten_times(tmp_path: Path) -> None:
    figures = kill_campaign(tmp_path, kills=10, seed=1, n_files=10)
    print(f"\nindex kills: {figures}")


@pytest.mark.fuzz
def test_sigkill_index_many_times(tmp_path: Path) -> None:
    figures = kill_campaign(tmp_path, kills=int(os.environ.get("RIPELM_KILLS", "100")), seed=2026, n_files=24)
    print(f"\nindex kills: {figures}")
    assert figures["mid_job_kills"] >= figures["kills"] // 4


def test_store_killed_between_fts_table_and_triggers_is_repaired(tmp_path: Path) -> None:
    """The state a kill during the store's first open can leave (sqlite-utils writes the FTS table and its
    triggers in two scripts): the next open must restore the triggers, or BM25 search silently misses
    every chunk indexed afterwards."""
    from ripelm.runtime.retrieval.store import Store

    db = tmp_path / "retrieval.db"
    Store(db).close()
    con = sqlite3.connect(db)
    for trigger in ("chunks_ai", "chunks_ad", "chunks_au"):
        con.execute(f"DROP TRIGGER {trigger}")
    con.execute("DELETE FROM meta WHERE key = 'schema_version'")
    con.commit()
    con.close()
    Store(db).close()
    con = sqlite3.connect(db)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    con.close()
    assert {"chunks_ai", "chunks_ad", "chunks_au"} <= names
