"""What a chat database must hold after a kill, from the writes a killed process reported.

`ChatState` is the content of a chat database (chats and messages, without timestamps). `replay` applies
a run's reported writes (tests/chat_session_proc.py prints `begin`/`ok` around each ChatStore write) to
the state the run started from; `check_after_kill` then reads the real file and requires that:

* the file is sound: `PRAGMA integrity_check` and `PRAGMA foreign_key_check` find nothing, and it opens
  with ChatStore;
* it holds exactly the state after every write whose `ok` was reported, or that state with the one write
  that had begun but not returned applied whole (a write is atomic: all of it or none of it);
* a reply still "partial" holds a prefix of the text streamed for it, at least the last checkpoint.
"""

from __future__ import annotations

import copy
import inspect
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import PARTIAL

_CHAT_FIELDS = ("title", "model", "draft", "system", "params", "collection")
_MSG_FIELDS = ("chat_id", "role", "content", "state", "stats", "sources")
_NEW_ROW = {"new_chat": "chats", "add_message": "messages", "start_reply": "messages"}


@dataclass
class ChatState:
    chats: dict[int, dict[str, Any]] = field(default_factory=dict)
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)


def read_db(path: Path) -> ChatState:
    """The database's chats and messages, after checking that SQLite finds the file sound."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "messages" not in tables:  # killed before the schema was written: nothing can be stored yet
            return ChatState()
        con.row_factory = sqlite3.Row
        chats = {r["id"]: {k: r[k] for k in _CHAT_FIELDS} for r in con.execute("SELECT * FROM chats")}
        messages = {r["id"]: {k: r[k] for k in _MSG_FIELDS} for r in con.execute("SELECT * FROM messages")}
    finally:
        con.close()
    for c in chats.values():
        c["params"] = json.loads(c["params"] or "{}")
    for m in messages.values():
        m["stats"] = json.loads(m["stats"]) if m["stats"] else None
        m["sources"] = json.loads(m["sources"]) if m["sources"] else None
    ChatStore(path).close()  # and the app can open it (schema version, migrations)
    return ChatState(chats, messages)


def _bind(op: str, args: list[Any], kw: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(getattr(ChatStore, op)).bind(None, *args, **kw)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self")
    out.update(out.pop("settings", {}))
    return out


def _message(chat_id: int, role: str, content: str, state: str, sources: Any) -> dict[str, Any]:
    return {"chat_id": chat_id, "role": role, "content": content, "state": state, "stats": None,
            "sources": sources or None}  # fmt: skip


def apply(state: ChatState, op: str, a: dict[str, Any], new_id: int | None) -> ChatState:
    """`state` after the ChatStore write `op` with bound arguments `a` (`new_id`: the row it inserted)."""
    s = copy.deepcopy(state)
    if op == "new_chat":
        s.chats[new_id] = {"model": None, "draft": None, "system": None, "params": {}, "collection": None}
        s.chats[new_id].update({k: a[k] for k in _CHAT_FIELDS if k in a})
    elif op == "update_chat":
        s.chats[a["chat_id"]].update({k: a[k] for k in _CHAT_FIELDS if k in a})
    elif op == "rename_chat":
        s.chats[a["chat_id"]]["title"] = " ".join(a["title"].split())
    elif op == "delete_chat":
        del s.chats[a["chat_id"]]
        s.messages = {i: m for i, m in s.messages.items() if m["chat_id"] != a["chat_id"]}
    elif op == "add_message":
        s.messages[new_id] = _message(a["chat_id"], a["role"], a["content"], a["state"], a["sources"])
    elif op == "start_reply":
        s.messages[new_id] = _message(a["chat_id"], "assistant", "", PARTIAL, a["sources"])
    elif op == "save_reply":
        m = s.messages[a["message_id"]]
        m.update(content=a["content"], state=a["state"])
        if a["stats"] is not None:
            m["stats"] = a["stats"]
    elif op == "set_sources":
        s.messages[a["message_id"]]["sources"] = a["sources"]
    elif op == "edit_message":
        s.messages[a["message_id"]]["content"] = a["content"]
    elif op == "delete_messages_from":
        s.messages = {i: m for i, m in s.messages.items()
                      if not (m["chat_id"] == a["chat_id"] and i >= a["message_id"])}  # fmt: skip
    else:
        raise AssertionError(f"unknown store write {op}")
    return s


@dataclass
class Run:
    """What one run of the chat process reported, replayed over the state it started from."""

    state: ChatState  # after every write that returned
    pending: tuple[str, dict[str, Any]] | None  # a write that had begun and not returned
    streamed: dict[int, str]  # message id -> the text streamed for it
    events: list[dict[str, Any]]
    writes: int = 0
    user_messages: int = 0
    checkpoints: int = 0


def replay(start: ChatState, lines: list[str]) -> Run:
    events = [json.loads(line) for line in lines if line.startswith("{")]
    run = Run(start, None, {}, events)
    for ev in events:
        if ev["ev"] == "begin":
            run.pending = (ev["op"], _bind(ev["op"], ev["args"], ev["kw"]))
        elif ev["ev"] == "ok":
            assert run.pending is not None and run.pending[0] == ev["op"], ev
            op, a = run.pending
            if op == "save_reply":  # a stored reply only ever grows while it streams
                before = run.state.messages[a["message_id"]]["content"]
                assert a["content"].startswith(before), (before, a["content"])
                run.checkpoints += a["state"] == PARTIAL
            run.user_messages += op == "add_message" and a["role"] == "user"
            run.state = apply(run.state, op, a, ev["result"] if op in _NEW_ROW else None)
            run.pending = None
            run.writes += 1
        elif ev["ev"] == "stream":  # ids are reused after a delete (regenerate): a new reply starts empty
            run.streamed[ev["message"]] = ""
        elif ev["ev"] == "tok":
            run.streamed[ev["message"]] = run.streamed.get(ev["message"], "") + ev["text"]
        elif ev["ev"] == "resume":
            interrupted = [i for i, m in sorted(start.messages.items())
                           if m["chat_id"] == ev["chat"] and m["state"] == PARTIAL]  # fmt: skip
            assert ev["interrupted"] == interrupted, (ev, interrupted)
    return run


def where(run: Run) -> str:
    """Where in the chat work the process was when it died."""
    names = [e["ev"] for e in run.events]
    if "opened" not in names:
        return "starting up (before the store was opened)"
    if "ready" not in names:
        return "loading the model / resuming the chat"
    if run.pending is not None:
        op = run.pending[0]
        if op == "save_reply":
            op = "save_reply (checkpoint)" if run.pending[1]["state"] == PARTIAL else "save_reply (finish)"
        return f"during {op}"
    streaming = [e for e in run.events if e["ev"] in ("stream", "streamed")]
    if streaming and streaming[-1]["ev"] == "stream":
        return "mid-stream, between checkpoints"
    return "between store writes (prompt building, chat switching)"


def check_after_kill(db: Path, run: Run) -> tuple[ChatState, str]:
    """The database's state, checked against the run (see the module docstring), and what became of the
    write in flight: "none", "rolled back" or "committed"."""
    found = read_db(db)
    outcome = "none"
    if found != run.state:
        assert run.pending is not None, _diff(run.state, found)
        op, a = run.pending
        new_id = None
        if op in _NEW_ROW:
            table = _NEW_ROW[op]
            new = set(getattr(found, table)) - set(getattr(run.state, table))
            assert len(new) == 1, (op, new, _diff(run.state, found))
            new_id = new.pop()
        after = apply(run.state, op, a, new_id)
        assert found == after, f"neither before nor after {op}: " + _diff(after, found)
        outcome = "committed"
    elif run.pending is not None:
        outcome = "rolled back"
    for i, m in found.messages.items():
        if m["role"] == "assistant" and m["state"] == PARTIAL and i in run.streamed:
            assert run.streamed[i].startswith(m["content"]), (m["content"], run.streamed[i])
    return found, outcome


def _diff(want: ChatState, got: ChatState) -> str:
    out = []
    for name in ("chats", "messages"):
        w, g = getattr(want, name), getattr(got, name)
        for i in sorted(set(w) | set(g)):
            if w.get(i) != g.get(i):
                out.append(f"{name}[{i}]: expected {w.get(i)!r}, found {g.get(i)!r}")
    return "; ".join(out) or "no difference"
