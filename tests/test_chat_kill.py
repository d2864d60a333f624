"""SIGKILL while a reply streams: the chat database stays intact, earlier messages survive, and the
reply being written is either a partial message holding text or absent, never corrupt."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

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
