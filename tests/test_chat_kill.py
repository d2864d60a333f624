"""SIGKILL while a reply streams: the chat database stays intact, earlier messages survive, and the
reply being written is either a partial message holding text or absent, never corrupt."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from chat_ledger import ChatState, check_after_kill, replay, where
from polling import wait_until

from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import PARTIAL

HELPER = Path(__file__).with_name("chat_writer_proc.py")


def test_sigkill_mid_reply_loses_nothing_committed(tiny_model_factory, tmp_path):
    model = tiny_model_factory(qtype="Q4_0", n_layers=2)
    db = tmp_path / "chats.db"
    env = {**os.environ, "RIPELM_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), str(model), str(db)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()  # blocks until the helper reports a checkpointed partial reply
        assert line.startswith("streaming "), line
        reply_id = int(line.split()[1])
        # poll from another connection until a later checkpoint has grown the stored text
        watcher = sqlite3.connect(db)
        first = watcher.execute("SELECT content FROM messages WHERE id = ?", [reply_id]).fetchone()[0]
        seen = first
        deadline = time.monotonic() + 30
        while seen == first and time.monotonic() < deadline:
            time.sleep(0.02)  # poll interval
            seen = watcher.execute("SELECT content FROM messages WHERE id = ?", [reply_id]).fetchone()[0]
        watcher.close()
        assert seen != first and seen.startswith(first)
        assert proc.poll() is None, "the helper finished before it could be killed; raise its max_tokens"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    store = ChatStore(db)
    assert store.integrity() == "ok"
    (chat,) = store.chats()
    msgs = store.messages(chat.id)
    assert [(m.role, m.content) for m in msgs[:5]] == [
        ("user", "question 0"),
        ("assistant", "answer 0"),
        ("user", "question 1"),
        ("assistant", "answer 1"),
        ("user", "now a very long answer please"),
    ]
    assert len(msgs) in (5, 6)
    if len(msgs) == 6:
        reply = msgs[5]
        assert reply.id == reply_id and reply.role == "assistant" and reply.state == PARTIAL
        assert reply.content.startswith(seen)  # a checkpoint at least as late as the last one seen
    store.close()


# ---- the kill campaign: a process that really chats, SIGKILLed at random points --------------------------

SESSION = Path(__file__).with_name("chat_session_proc.py")


class ChatProcess:
    """tests/chat_session_proc.py running, and a thread collecting its stdout lines (so that it never blocks
    on a full pipe and every line it wrote before dying is read)."""

    def __init__(self, model: Path, db: Path, seed: int, extra: list[str]):
        self.started = time.monotonic()
        self.err_path = db.parent / "chat-stderr.txt"
        with open(self.err_path, "w") as err:
            cmd = [sys.executable, str(SESSION), str(model), str(db), str(seed), *extra]
            env = {**os.environ, "RIPELM_HOME": str(db.parent)}
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def ready(self) -> bool:
        return any('"ready"' in line for line in self.lines) or self.proc.poll() is not None

    def kill_at(self, when: float) -> None:
        while time.monotonic() < when and self.proc.poll() is None:
            time.sleep(0.002)  # the kill time itself is what is random; this is not a wait for a state
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def end(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.reader.join(timeout=60)
        return self.proc.returncode

    def stderr(self) -> str:
        return self.err_path.read_text()


def chat_kill_campaign(model: Path, home: Path, kills: int, seed: int) -> dict:
    """`kills` runs of the chat process on one database, each SIGKILLed: after a random time once it is
    ready (6 in 10), at a random SQL statement it is about to run (3 in 10), or while it starts (1 in 10).
    Every kill is checked (tests/chat_ledger.py); then a last run carries on in the same database."""
    db = home / "chats.db"
    rng = random.Random(seed)
    state = ChatState()
    landed: Counter[str] = Counter()
    in_flight: Counter[str] = Counter()
    figures: Counter[str] = Counter()
    startup_s = 2.0
    for i in range(kills):
        mode = rng.choices(["timed", "sql", "startup"], weights=[6, 3, 1])[0]
        extra = ["--die-at-sql", str(rng.randint(1, 300))] if mode == "sql" else []
        chat = ChatProcess(model, db, seed * 1000 + i, extra)
        try:
            if mode == "startup":
                chat.kill_at(chat.started + rng.uniform(0.0, startup_s))
            elif mode == "timed":
                assert wait_until(chat.ready, 120)
                startup_s = time.monotonic() - chat.started
                chat.kill_at(time.monotonic() + rng.uniform(0.0, 2.0))
            else:  # it kills itself at its chosen statement
                chat.kill_at(time.monotonic() + 120)
        finally:
            code = chat.end()
        assert code == -signal.SIGKILL, f"the chat process ended on its own ({code}): {chat.stderr()}"
        run = replay(state, chat.lines)
        state, outcome = check_after_kill(db, run)
        landed[where(run)] += 1
        in_flight[outcome] += 1
        figures["writes_reported"] += run.writes
        figures["user_messages_committed"] += run.user_messages
        figures["checkpoints_committed"] += run.checkpoints
        figures["messages_checked"] += len(run.state.messages)
    chat = ChatProcess(model, db, seed * 1000 + kills, ["--ops", "4"])
    chat.proc.wait(timeout=300)
    code = chat.end()
    assert code == 0, chat.stderr()
    run = replay(state, chat.lines)
    assert run.pending is None and run.events[-1]["ev"] == "finished"
    final, _ = check_after_kill(db, run)
    streamed = [e["message"] for e in run.events if e["ev"] == "streamed"]
    assert streamed and all(final.messages[i]["state"] != PARTIAL for i in streamed if i in final.messages)
    return {
        "kills": kills,
        "corrupt_databases": 0,  # check_after_kill asserted integrity after every kill
        "lost_committed_writes": 0,  # ... and that every reported write was there
        "write_in_flight": dict(in_flight),
        "landed": dict(landed),
        **figures,
        "chats_at_end": len(final.chats),
        "messages_at_end": len(final.messages),
    }


def test_sigkill_chatting_at_random_points(tiny_model_factory, tmp_path):
    figures = chat_kill_campaign(tiny_model_factory(qtype="Q4_0", n_layers=2), tmp_path, kills=8, seed=1)
    print(f"\nchat kills: {figures}")
    assert figures["user_messages_committed"] > 0 and figures["checkpoints_committed"] > 0


@pytest.mark.fuzz
@pytest.mark.timeout(3600)  # ~7 min for 100 kills on one free core; more on a busy one
def test_sigkill_chatting_many_times(tiny_model_factory, tmp_path):
    kills = int(os.environ.get("RIPELM_KILLS", "100"))
    figures = chat_kill_campaign(tiny_model_factory(qtype="Q4_0", n_layers=2), tmp_path, kills, seed=2026)
    print(f"\nchat kills: {figures}")
    assert figures["landed"].get("mid-stream, between checkpoints", 0) >= kills // 10
    assert {"committed", "rolled back"} <= set(figures["write_in_flight"])
