"""`ripe index --watch`: a real watcher process keeps the collection in step with a folder (edits, new
files, new folders, deletions, each within 2 s), and a SIGKILL in the middle of a watch-triggered re-index
leaves a consistent store that a plain `ripe index` then completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from retrieval_helpers import make_home
from test_index_crash import snapshot

from ripelm.runtime.retrieval.watch import relevant

LIMIT_S = 2.0


def test_which_events_matter():
    assert relevant("/notes/a.md", False) and relevant("/notes/b.docx", False)
    assert relevant("/notes/sub", True)
    assert not relevant("/notes/retrieval.db-wal", False)
    assert not relevant("/notes/.a.md.swp", False) and not relevant("/notes/.git/a.md", False)
    assert not relevant("/notes/node_modules/x.md", False) and not relevant("/notes/.cache", True)


def start_watch(home: Path, root: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, RIPELM_HOME=str(home))
    cmd = [sys.executable, "-m", "ripelm.cli", "index", str(root), "-c", "w", "--workers", "1", "--watch"]
    proc = subprocess.Popen(cmd, env=env, stdout=out.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "watching" not in out.read_text():
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, "the first index did not finish"
        time.sleep(0.05)
    return proc


def docs(db: Path) -> dict[str, str]:
    """{file name: text of its chunks}"""
    con = sqlite3.connect(db, timeout=10)
    try:
        rows = con.execute(
            "SELECT d.path, group_concat(c.text, ' ') FROM documents d JOIN chunks c ON c.document_id = d.id "
            "GROUP BY d.id"
        ).fetchall()
    finally:
        con.close()
    return {Path(p).name: t for p, t in rows}


def within(db: Path, check, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < LIMIT_S + 10:  # measure past the limit, to report how late it was
        if check(docs(db)):
            took = time.monotonic() - t0
            assert took <= LIMIT_S, f"{what} took {took:.2f} s"
            return took
        time.sleep(0.02)
    pytest.fail(f"{what} never reached the store")


def settled(log: Path, quiet_s: float = 0.5, limit_s: float = 10.0) -> str:
    """The watch's log once it has not changed for `quiet_s`."""
    text, since, t0 = log.read_text(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
        now = log.read_text()
        if now != text:
            text, since = now, time.monotonic()
    return text


def test_watch_follows_edits_additions_and_deletions(tmp_path):
    home = make_home(tmp_path / "home")
    root = tmp_path / "notes"
    root.mkdir()
    for i in range(3):
        (root / f"n{i}.md").write_text(f"# Note {i}\n\nA note about paged attention number {i}.\n")
    out = tmp_path / "watch.log"
    proc = start_watch(home, root, out)
    db = home / "retrieval.db"
    try:
        assert set(docs(db)) == {"n0.md", "n1.md", "n2.md"}
        (root / "n1.md").write_text("# Note 1\n\nRewritten: speculative decoding with a draft model.\n")
        within(db, lambda d: "speculative" in d.get("n1.md", ""), "an edit")
        (root / "new.md").write_text("# New\n\nQuantization to four bits.\n")
        within(db, lambda d: "four bits" in d.get("new.md", ""), "a new file")
        sub = root / "later" / "deeper"
        sub.mkdir(parents=True)
        (sub / "inner.txt").write_text("Knowledge distillation with a temperature.\n")
        within(db, lambda d: "inner.txt" in d, "a file in a new folder")
        (root / "n0.md").unlink()
        within(db, lambda d: "n0.md" not in d, "a deletion")
        (root / "n2.md").rename(root / "moved.md")
        within(db, lambda d: "n2.md" not in d and "moved.md" in d, "a rename")
        # same content, new mtime: re-stamped by its hash, not re-embedded (same rules as `ripe index`)
        before = settled(out)  # the rename's report line is written just after its commit
        os.utime(root / "new.md", (time.time() + 5, time.time() + 5))
        time.sleep(1.0)
        assert out.read_text() == before  # nothing re-indexed, so nothing reported
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "stopped watching" in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert set(snapshot(db)) == {str(root / n) for n in ("n1.md", "new.md", "moved.md")} | {
        str(sub / "inner.txt")
    }


def test_sigkill_during_a_watch_triggered_reindex(tmp_path):
    home = make_home(tmp_path / "home")
    root = tmp_path / "notes"
    root.mkdir()
    (root / "first.md").write_text("# First\n\nThe first note.\n")
    out = tmp_path / "watch.log"
    proc = start_watch(home, root, out)
    db = home / "retrieval.db"
    n = 160
    try:
        for i in range(n):  # one chunk each; embedded in batches, written one document per transaction
            (root / f"m{i:03d}.md").write_text(f"# Memo {i}\n\nMemo {i} on block tables and draft tokens.\n")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(docs(db)) < 2:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = snapshot(db)  # integrity ok, FTS in step, every document whole
    assert 2 <= len(state) < n + 1, "the re-index finished before it could be killed"
    env = dict(os.environ, RIPELM_HOME=str(home))
    done = subprocess.run(
        [sys.executable, "-m", "ripelm.cli", "index", str(root), "-c", "w", "--workers", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert f"{n + 1 - len(state)} indexed, {len(state)} unchanged" in done.stdout
    assert len(snapshot(db)) == n + 1
    found = subprocess.run(
        [sys.executable, "-m", "ripelm.cli", "search", "memo 42 block tables", "-c", "w", "--mode", "bm25"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0 and "m042.md" in found.stdout, found.stdout + found.stderr
