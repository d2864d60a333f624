"""A process that chats the way `ripe chat` does, for the chat kill campaign (tests/test_chat_kill.py).

It opens the chat database (continuing whatever an earlier, killed run left), loads the real engine on a
tiny GGUF model, picks up the most recently used chat as the app does on start, and then does seeded
random chat work through the real store and `ReplyRecorder`: sends messages and streams replies
(checkpointed while they stream), stops replies midway, regenerates, edits and resends, starts, switches,
renames and deletes chats, changes a chat's settings. It runs until it is SIGKILLed (or `--ops` ops).

Everything it does to the store is reported on stdout as JSON lines: `begin` (the call and its
arguments) before a store write and `ok` (its result) once the write returned, so the parent knows what
was committed; `tok` carries each streamed text piece before it reaches the recorder, so the parent
knows what a reply would have held. `--die-at-sql K` makes the process SIGKILL itself when its K-th SQL
statement after start-up is about to run (inside a transaction, at its COMMIT, or just after it).

usage: python chat_session_proc.py MODEL.gguf CHATS.db SEED [--ops N] [--die-at-sql K]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

from ripelm import chat_turns
from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import PARTIAL
from ripelm.chat_turns import ReplyRecorder, build_prompt, history, parse_sampling, sampling_for
from ripelm.generation import Generation
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.sampling import SamplingParams

DEFAULT_TITLE = "New chat"  # ripelm.tui.chat_actions.DEFAULT_TITLE (not imported: Textual is slow to load)
# The tiny model streams a few hundred tokens a second, so a reply lasts well under a second; checkpoints
# are made more often than the app's 0.25 s so that kills land between many of them.
CHECKPOINT_S = 0.03
WRITES = ("new_chat", "update_chat", "rename_chat", "delete_chat", "add_message", "start_reply",
          "save_reply", "set_sources", "edit_message", "delete_messages_from")  # fmt: skip
WORDS = "cache block token draft model verify attention prefix batch kernel weight vector chunk".split()


def report(event: str, **fields: Any) -> None:
    print(json.dumps({"ev": event, **fields}), flush=True)


def _result(value: Any) -> Any:
    return getattr(value, "id", value)


class ReportingStore:
    """The real ChatStore, with each write reported before it starts and after it returns."""

    def __init__(self, store: ChatStore):
        self._store = store
        self._n = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            self._n += 1
            report("begin", n=self._n, op=name, args=list(args), kw=kwargs)
            value = attr(*args, **kwargs)
            report("ok", n=self._n, op=name, result=_result(value))
            return value

        return write


class Session:
    def __init__(self, store: ReportingStore, backend: EngineBackend, rng: random.Random):
        self.store = store
        self.backend = backend
        self.rng = rng
        chats = store.chats()
        self.chat = chats[0] if chats else store.new_chat(DEFAULT_TITLE)  # what the app opens on start
        rows = store.db.execute(  # on every branch: a regenerated reply keeps the interrupted one beside it
            "SELECT id FROM messages WHERE chat_id = ? AND state = ? ORDER BY id", [self.chat.id, PARTIAL]
        )
        interrupted = [r[0] for r in rows.fetchall()]
        report("resume", chat=self.chat.id, interrupted=interrupted, chats=len(chats))

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def reply(self, stop_after: int | None = None, replace_from: int | None = None) -> None:
        """Stream the next assistant message of the current chat, as the app's worker and UI thread do
        (replacing message `replace_from` and what follows, as regenerate does)."""
        chat = self.store.chat(self.chat.id)
        defaults = SamplingParams(temperature=0.9, seed=self.rng.randrange(1 << 30),
                                  max_tokens=self.rng.randint(8, 160))  # fmt: skip
        params = sampling_for(chat, defaults)
        msgs = [m for m in self.store.messages(chat.id) if replace_from is None or m.id < replace_from]
        turns = history(chat, msgs)
        recorder = ReplyRecorder.start(self.store, chat.id, replace_from=replace_from)  # type: ignore[arg-type]
        report("stream", message=recorder.message.id)
        prompt = build_prompt(self.backend, turns, params)
        gen = Generation(self.backend, prompt.ids, params)
        pieces = 0
        for ev in gen.events():
            if ev.text:
                report("tok", message=recorder.message.id, text=ev.text)
                recorder.feed(ev.text)
                pieces += 1
            if ev.done:
                recorder.finish(ev.stats)
            elif stop_after is not None and pieces >= stop_after and not gen.cancel_requested.is_set():
                gen.cancel()  # Esc: the engine drops the request, the stream ends as "cancelled"
        report("streamed", message=recorder.message.id)

    def send(self, stop_after: int | None = None) -> None:
        text = self.text(1, 12)
        if self.chat.title == DEFAULT_TITLE:
            self.chat = self.store.rename_chat(self.chat.id, text[:40])
        self.store.add_message(self.chat.id, "user", text)
        self.reply(stop_after)

    def regenerate(self) -> None:
        msgs = self.store.messages(self.chat.id)
        if msgs and msgs[-1].role == "assistant":
            self.reply(replace_from=msgs[-1].id)

    def edit_last(self) -> None:
        users = [m for m in self.store.messages(self.chat.id) if m.role == "user"]
        if users:
            self.store.add_message(self.chat.id, "user", self.text(1, 8), replace_from=users[-1].id)
            self.reply()

    def new_chat(self) -> None:
        self.chat = self.store.new_chat(DEFAULT_TITLE, model=self.chat.model)

    def switch(self) -> None:
        self.chat = self.rng.choice(self.store.chats())

    def rename(self) -> None:
        self.chat = self.store.rename_chat(self.chat.id, "  " + self.text(1, 4).title() + "  ")

    def delete(self) -> None:
        chats = self.store.chats()
        if len(chats) > 1:
            self.store.delete_chat(self.chat.id)
            self.chat = self.store.chats()[0]

    def settings(self) -> None:
        text = f"temperature={self.rng.choice([0, 0.5, 1.0])} top_k={self.rng.choice([0, 20, 40])}"
        params = parse_sampling(text, SamplingParams())
        if self.rng.random() < 0.5:
            self.chat = self.store.update_chat(self.chat.id, params=params)
        else:
            self.chat = self.store.update_chat(self.chat.id, system=self.text(2, 6) or None)

    def step(self) -> None:
        ops = [(self.send, 8), (lambda: self.send(self.rng.randint(1, 20)), 2), (self.regenerate, 2),
               (self.edit_last, 1), (self.new_chat, 1), (self.switch, 1), (self.rename, 1), (self.delete, 1),
               (self.settings, 1)]  # fmt: skip
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        op()


def die_at_statement(store: ChatStore, k: int) -> None:
    """SIGKILL this process just before its k-th SQL statement from now runs (SQLite's statement trace
    fires as a statement starts)."""
    count = 0

    def trace(sql: str) -> None:
        nonlocal count
        count += 1
        if count >= k:
            report("die", sql=sql.split()[0] if sql.split() else sql)
            os.kill(os.getpid(), signal.SIGKILL)

    store.db.conn.set_trace_callback(trace)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("db", type=Path)
    p.add_argument("seed", type=int)
    p.add_argument("--ops", type=int, default=100_000)
    p.add_argument("--die-at-sql", type=int, default=None)
    args = p.parse_args()
    chat_turns.CHECKPOINT_S = CHECKPOINT_S
    rng = random.Random(args.seed)
    store = ChatStore(args.db)
    report("opened")
    backend = EngineBackend(args.model, device="cpu", n_ctx=1024, kv_memory=32 << 20)
    try:
        if args.die_at_sql is not None:
            die_at_statement(store, args.die_at_sql)
        session = Session(ReportingStore(store), backend, rng)
        report("ready")
        for _ in range(args.ops):
            session.step()
        report("finished")
    finally:
        backend.close()
        store.close()


if __name__ == "__main__":
    sys.exit(main())
