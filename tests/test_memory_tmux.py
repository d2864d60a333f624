"""The installed `ripe chat` in a real terminal (tmux) on the bundled model, memory on (the default): a
name stated in one chat is saved (the app says so), and in a new chat the question about it gets the
memory into its prompt (recorded with the reply). What the test asserts is that mechanism; whether the
135M model then says the name unforced is printed (run with -s), not asserted. Skipped without tmux."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from retrieval_helpers import make_home
from test_chat_tmux import end_session, poll, screen, tmux

from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import DONE

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

RIPE = Path(sys.executable).with_name("ripe")


def ripe_command() -> str:
    """The installed `ripe` script; in a checkout without one, the same entry point through this Python."""
    if RIPE.is_file():
        return str(RIPE)
    return f"{shlex.quote(sys.executable)} -m ripelm.cli"


def replies(db: Path) -> list[tuple[int, str, dict | None]]:
    """(chat id, text, stats) of every finished reply."""
    if not db.is_file():
        return []
    store = ChatStore(db)
    try:
        return [
            (c.id, m.content, m.stats)
            for c in store.chats()
            for m in store.messages(c.id)
            if m.role == "assistant" and m.state == DONE
        ]
    finally:
        store.close()


def test_a_stated_name_is_recalled_in_a_new_chat(bundled_model_path, tmp_path):
    home = make_home(tmp_path / "home")  # the embedder already converted (as after a first `ripe index`)
    db = home / "chats.db"
    session = f"ripe-memory-{os.getpid()}"
    cmd = f"env RIPELM_HOME={home} TERM=xterm-256color {ripe_command()} chat --temp 0 -n 40 --ctx 2048"
    tmux(session, "new-session", "-d", "-s", session, "-x", "110", "-y", "34", cmd)
    try:
        poll(lambda: "Enter sends" in screen(session), 60, "the app to start")
        tmux(session, "send-keys", "-t", session, "Hello! My name is Sam.", "Enter")
        poll(lambda: "remembered" in screen(session), 30, "the app to say it remembered")
        poll(lambda: len(replies(db)) == 1, 180, "the first reply")
        store = ChatStore(db)
        (mem,) = store.memories()
        (first,) = store.chats()
        said = [m for m in store.messages(first.id) if m.role == "user"][0]
        store.close()
        assert mem.content == "The user's name is Sam."
        assert (mem.chat_id, mem.message_id) == (first.id, said.id)  # where it was said

        tmux(session, "send-keys", "-t", session, "C-n")
        poll(lambda: "New chat" in screen(session), 10, "the new chat")
        tmux(session, "send-keys", "-t", session, "What is my name?", "Enter")
        poll(lambda: len(replies(db)) == 2, 180, "the reply in the new chat")
        chat_id, answer, stats = next(r for r in replies(db) if r[0] != first.id)
        assert stats is not None and stats["memories"] == [mem.id]  # the memory was in its prompt
        said_name = "Sam" in answer
        print(f"\n135M model asked 'What is my name?' in a new chat: {answer!r} (says the name: {said_name})")
    finally:
        end_session(session)
