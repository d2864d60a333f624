"""The installed `ripe chat` in a real terminal (tmux) on the bundled model: type a question, read the
streamed answer from the screen, then SIGKILL the app while a second reply streams and check the chat
database. Skipped without tmux."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import DONE, PARTIAL

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

RIPE = Path(sys.executable).with_name("ripe")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # poll interval
    raise AssertionError(f"timed out waiting for {what}")


def test_ripe_chat_in_tmux(bundled_model_path, tmp_path):
    if not RIPE.is_file():
        pytest.skip("the ripe script is not installed next to this python")
    session = f"ripe-test-{os.getpid()}"
    cmd = f"env RIPELM_HOME={tmp_path} TERM=xterm-256color {RIPE} chat --temp 0 -n 300 --ctx 2048"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd)
    try:
        poll(lambda: "Enter sends" in screen(session), 60, "the app to start")
        pid = int(tmux("display-message", "-p", "-t", session, "#{pane_pid}").strip())
        tmux("send-keys", "-t", session, "What is the capital of France?", "Enter")
        # the answer streams onto the screen: it grows, then the reply ends (the label loses "streaming")
        poll(lambda: "Assistant" in screen(session), 60, "the reply to start")
        db = tmp_path / "chats.db"

        def replies(state: str) -> list[str]:
            if not db.is_file():
                return []
            store = ChatStore(db)
            try:
                msgs = [m for c in store.chats() for m in store.messages(c.id)]
                return [m.content for m in msgs if m.role == "assistant" and m.state == state]
            finally:
                store.close()

        answer = poll(lambda: replies(DONE), 120, "the first answer to finish")[0]
        shown = poll(lambda: "Paris" in screen(session) and screen(session), 10, "the answer on screen")
        assert "Paris" in answer, answer
        assert "What is the capital of France?" in shown

        tmux("send-keys", "-t", session, "Write a long story about a dragon.", "Enter")
        poll(lambda: any(len(t) > 40 for t in replies(PARTIAL)), 120, "the second reply to stream")
        os.kill(pid, signal.SIGKILL)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    store = ChatStore(tmp_path / "chats.db")
    assert store.integrity() == "ok"
    (chat,) = store.chats()
    msgs = store.messages(chat.id)
    assert [m.role for m in msgs[:3]] == ["user", "assistant", "user"]
    assert msgs[1].content == answer and msgs[2].content == "Write a long story about a dragon."
    assert len(msgs) == 3 or (msgs[3].state == PARTIAL and len(msgs[3].content) > 40)
    store.close()
