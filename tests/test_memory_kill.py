"""SIGKILL while memories are saved, edited and deleted (a real process, tests/memory_writer_proc.py):
after every kill the database is intact and holds every write the process reported as committed; the
write in flight is either whole or absent."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from polling import wait_until

from ripelm.chat_store import ChatStore

HELPER = Path(__file__).with_name("memory_writer_proc.py")


def run_and_kill(db: Path, seed: int, after_s: float) -> list[dict]:
    env = {**os.environ, "RIPELM_HOME": str(db.parent)}
    proc = subprocess.Popen([sys.executable, str(HELPER), str(db), str(seed)], stdout=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any('"ready"' in x for x in lines) or proc.poll() is not None, 120)
        deadline = time.monotonic() + after_s
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.002)  # the kill moment is what is random; this is not a wait for a state
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return [json.loads(x) for x in lines if x.strip()]


def test_sigkill_while_saving_memories_loses_nothing_committed(tmp_path):
    db = tmp_path / "chats.db"
    rng = random.Random(18)
    expected: dict[int, dict] = {}  # memory id -> text, chat, message, as the last committed write left it
    writes = in_flight = 0
    for seed in range(6):
        events = run_and_kill(db, seed, rng.uniform(0.2, 1.5))
        pending: dict | None = None  # the write begun and not reported done: in flight at the kill
        for ev in events:
            if ev["ev"] == "begin":
                pending = ev
            elif ev["ev"] == "done":
                writes += 1
                if ev["op"] == "save":
                    expected[ev["id"]] = {"text": ev["text"], "chat": ev["chat"], "message": ev["message"]}
                    pending["texts"] = [t for t in pending["texts"] if t != ev["text"]]
                    if pending["texts"]:
                        continue  # the detector's next fact of the same message is still to come
                elif ev["op"] == "edit":
                    expected[ev["id"]]["text"] = ev["text"]
                else:
                    expected.pop(ev["id"])
                pending = None
        store = ChatStore(db)
        try:
            assert store.integrity() == "ok"
            found = {m.id: (m.content, m.chat_id, m.message_id) for m in store.memories()}
            if pending is not None:  # the write in flight: whole or not at all
                in_flight += 1
                if pending["op"] == "delete" and pending["id"] not in found:
                    expected.pop(pending["id"])
                elif pending["op"] == "edit" and found.get(pending["id"], ("",))[0] == pending["text"]:
                    expected[pending["id"]]["text"] = pending["text"]
                elif pending["op"] == "save":
                    for mem_id in set(found) - set(expected):
                        content, chat_id, message_id = found[mem_id]
                        assert content in pending["texts"], f"a memory no write made: {content!r}"
                        expected[mem_id] = {"text": content, "chat": chat_id, "message": message_id}
            want = {i: (e["text"], e["chat"], e["message"]) for i, e in expected.items()}
            assert found == want  # every committed write is there, as written, and nothing else
            fts = store.db.execute("SELECT count(*) FROM memories_fts").fetchone()[0]
            assert fts == len(found)  # the search index agrees with the table
            store.db.execute("INSERT INTO memories_fts(memories_fts) VALUES ('integrity-check')")
        finally:
            store.close()
    assert writes > 20, f"only {writes} writes before the kills: the test did not exercise much"
    print(f"\nmemory kills: 6, writes committed {writes}, in flight {in_flight}, kept {len(expected)}")
