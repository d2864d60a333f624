"""The chat history: chats and their messages in SQLite, `chats.db` under the data dir.

Durability: WAL, and every write is one transaction, so a killed process (SIGKILL, a crash, a closed
terminal) never leaves a torn database and loses nothing whose `COMMIT` returned. What the user cannot get
back (a sent message, a finished reply, a chat created, changed or deleted) commits with
`synchronous=FULL`, flushed to disk before `COMMIT` returns, so it survives a power cut too. The
checkpoints of a reply still streaming commit with `synchronous=NORMAL` (no flush): a power cut can only
take that reply back to an earlier checkpoint, and the next FULL commit flushes them along. A flush costs
milliseconds; on every checkpoint it would stall the UI thread several times a second for nothing.

A streaming reply is stored as a "partial" message right away and rewritten (one small transaction)
at checkpoints while it streams, then marked done/cancelled/error when it ends.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from ripelm.chat_store.connection import Database
from ripelm.chat_store.memories import MemoryRecords
from ripelm.chat_store.message_vectors import MessageVectorRecords, fts_match
from ripelm.chat_store.records import (
    DONE,
    MATCH_END,
    MATCH_START,
    PARTIAL,
    STATES,
    Chat,
    Message,
    SearchHit,
)
from ripelm.chat_store.upgrades import SCHEMA_VERSION, schema_version, upgrade
from ripelm.errors import ChatStoreError
from ripelm.models.store import data_dir


def chats_db_path() -> Path:
    return data_dir() / "chats.db"


def _chat(row: dict[str, Any]) -> Chat:
    return Chat(
        id=row["id"],
        title=row["title"],
        model=row["model"],
        draft=row["draft"],
        system=row["system"],
        params=json.loads(row["params"] or "{}"),
        collection=row["collection"],
        memory=bool(row.get("memory", 1)),
        created=row["created"],
        updated=row["updated"],
    )


def _message(row: dict[str, Any]) -> Message:
    return Message(
        id=row["id"],
        chat_id=row["chat_id"],
        role=row["role"],
        content=row["content"],
        state=row["state"],
        created=row["created"],
        stats=json.loads(row["stats"]) if row["stats"] else None,
        sources=json.loads(row["sources"]) if row.get("sources") else None,
    )


_CHAT_FIELDS = ("title", "model", "draft", "system", "params", "collection", "memory")


class ChatStore(MemoryRecords, MessageVectorRecords):
    def __init__(self, path: Path | None = None):
        self.path = path or chats_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = Database(self.path)
            with self.db.ensure_autocommit_on():
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=5000")
            found = schema_version(self.db)
        except (OSError, sqlite3.Error) as e:
            raise ChatStoreError(f"cannot open the chat database {self.path}: {e}") from e
        if found > SCHEMA_VERSION:
            self.db.close()
            raise ChatStoreError(
                f"{self.path} has schema version {found}, newer than this ripelm knows ({SCHEMA_VERSION}); "
                "upgrade ripelm"
            )
        upgrade(self.db)

    def close(self) -> None:
        self.db.close()

    # ---- chats ------------------------------------------------------------------------------------
    def new_chat(self, title: str = "New chat", **settings: Any) -> Chat:
        now = time.time()
        row: dict[str, Any] = {"title": title, "created": now, "updated": now, "params": "{}"}
        for k, v in settings.items():
            if k not in _CHAT_FIELDS:
                raise ChatStoreError(f"unknown chat setting '{k}'")
            row[k] = json.dumps(v) if k == "params" else v
        names, marks = ", ".join(row), ", ".join("?" * len(row))  # the keys are _CHAT_FIELDS names
        with self.db.atomic():
            self.db.execute(f"INSERT INTO chats ({names}) VALUES ({marks})", list(row.values()))
            chat_id = self.db.execute("SELECT last_insert_rowid()").fetchone()[0]
        return self.chat(chat_id)

    def chat(self, chat_id: int) -> Chat:
        rows = list(self.db.query("SELECT * FROM chats WHERE id = ?", [chat_id]))
        if not rows:
            raise ChatStoreError(f"no chat with id {chat_id}")
        return _chat(rows[0])

    def chats(self, search: str = "") -> list[Chat]:
        """Most recently used first; `search` keeps chats whose title contains it (any case)."""
        sql = "SELECT * FROM chats"
        args: list[Any] = []
        if search.strip():
            sql += " WHERE instr(lower(title), lower(?)) > 0"
            args.append(search.strip())
        sql += " ORDER BY updated DESC, id DESC"
        return [_chat(r) for r in self.db.query(sql, args)]

    def update_chat(self, chat_id: int, **settings: Any) -> Chat:
        self.chat(chat_id)
        row: dict[str, Any] = {}
        for k, v in settings.items():
            if k not in _CHAT_FIELDS:
                raise ChatStoreError(f"unknown chat setting '{k}'")
            row[k] = json.dumps(v) if k == "params" else int(v) if k == "memory" else v
        row["updated"] = time.time()
        assignments = ", ".join(f"{k} = ?" for k in row)  # the keys are _CHAT_FIELDS names, checked above
        with self.db.atomic():
            self.db.execute(f"UPDATE chats SET {assignments} WHERE id = ?", [*row.values(), chat_id])
        return self.chat(chat_id)

    def rename_chat(self, chat_id: int, title: str) -> Chat:
        title = " ".join(title.split())
        if not title:
            raise ChatStoreError("a chat title cannot be empty")
        return self.update_chat(chat_id, title=title)

    def delete_chat(self, chat_id: int) -> None:
        with self.db.atomic():
            self.db.execute("DELETE FROM messages WHERE chat_id = ?", [chat_id])
            self.db.execute("DELETE FROM chats WHERE id = ?", [chat_id])

    # ---- messages ---------------------------------------------------------------------------------
    def messages(self, chat_id: int) -> list[Message]:
        """The branch shown: the messages from the chat's first to its leaf, each following the one before."""
        rows = self.db.query(
            "WITH RECURSIVE path(id) AS (SELECT leaf_id FROM chats WHERE id = ? "
            "UNION ALL SELECT m.parent_id FROM messages m JOIN path ON m.id = path.id "
            "WHERE m.parent_id IS NOT NULL) "
            "SELECT messages.* FROM messages JOIN path ON messages.id = path.id ORDER BY messages.id",
            [chat_id],
        )
        return [_message(r) for r in rows]

    def add_message(
        self,
        chat_id: int,
        role: str,
        content: str,
        *,
        state: str = DONE,
        sources: list[dict[str, Any]] | None = None,
        replace_from: int | None = None,
    ) -> Message:
        """Append a message to the branch shown. With `replace_from`, the message is a new version of that
        one (edit, regenerate): a sibling following what it followed, shown from now on; the old version
        and what came after it stay, as another branch (`versions`, `switch_to`). One transaction."""
        if state not in STATES:
            raise ValueError(f"unknown message state {state!r}")
        now = time.time()
        with self.db.atomic():
            if replace_from is not None:
                row = self.db.execute(
                    "SELECT parent_id FROM messages WHERE id = ? AND chat_id = ?", [replace_from, chat_id]
                ).fetchone()
                if row is None:
                    raise ChatStoreError(f"no message {replace_from} in chat {chat_id}")
            else:
                row = self.db.execute("SELECT leaf_id FROM chats WHERE id = ?", [chat_id]).fetchone()
            self.db.execute(
                "INSERT INTO messages (chat_id, role, content, state, created, sources, parent_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    chat_id,
                    role,
                    content,
                    state,
                    now,
                    json.dumps(sources) if sources else None,
                    row[0] if row else None,
                ],
            )
            msg_id = self.db.execute("SELECT last_insert_rowid()").fetchone()[0]
            self.db.execute("UPDATE chats SET updated = ?, leaf_id = ? WHERE id = ?", [now, msg_id, chat_id])
        return self.message(msg_id)

    def versions(self, chat_id: int) -> dict[int, list[int]]:
        """For each message of the branch shown that has other versions: the ids of all its versions (the
        messages following the same one, with the same role), oldest first."""
        shown = self.messages(chat_id)
        rows = self.db.execute("SELECT id, parent_id, role FROM messages WHERE chat_id = ?", [chat_id])
        groups: dict[tuple[Any, str], list[int]] = {}
        for mid, parent, role in rows.fetchall():
            groups.setdefault((parent, role), []).append(mid)
        ids_shown = [m.id for m in shown]
        parents = dict(zip(ids_shown, [None, *ids_shown[:-1]], strict=False))  # each follows the one before
        out = {}
        for m in shown:
            ids = sorted(groups.get((parents[m.id], m.role), []))
            if len(ids) > 1:
                out[m.id] = ids
        return out

    def switch_to(self, message_id: int) -> list[Message]:
        """Show the branch through this message: it and, below it, the newest version at each turn.
        Returns the branch now shown."""
        msg = self.message(message_id)
        leaf = message_id
        while True:
            row = self.db.execute("SELECT max(id) FROM messages WHERE parent_id = ?", [leaf]).fetchone()
            if row[0] is None:
                break
            leaf = row[0]
        with self.db.atomic():
            self.db.execute("UPDATE chats SET leaf_id = ? WHERE id = ?", [leaf, msg.chat_id])
        return self.messages(msg.chat_id)

    def message(self, message_id: int) -> Message:
        rows = list(self.db.query("SELECT * FROM messages WHERE id = ?", [message_id]))
        if not rows:
            raise ChatStoreError(f"no message with id {message_id}")
        return _message(rows[0])

    def start_reply(
        self, chat_id: int, sources: list[dict[str, Any]] | None = None, replace_from: int | None = None
    ) -> Message:
        """An empty assistant message marked partial, to be filled in by `save_reply` as it streams
        (replacing `replace_from` and what follows it, as `add_message` does)."""
        return self.add_message(
            chat_id, "assistant", "", state=PARTIAL, sources=sources, replace_from=replace_from
        )

    def save_reply(
        self, message_id: int, content: str, *, state: str = PARTIAL, stats: dict[str, Any] | None = None
    ) -> None:
        """Rewrite a streaming reply: a checkpoint (state "partial") without a disk flush, the final text
        and state with one (see the module docstring)."""
        if state not in STATES:
            raise ValueError(f"unknown message state {state!r}")
        if state == PARTIAL:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self.db.atomic():
                self.db.execute(
                    "UPDATE messages SET content = ?, state = ?, stats = coalesce(?, stats) WHERE id = ?",
                    [content, state, json.dumps(stats) if stats is not None else None, message_id],
                )
        finally:
            if state == PARTIAL:
                self.db.execute("PRAGMA synchronous=FULL")

    def set_sources(self, message_id: int, sources: list[dict[str, Any]]) -> None:
        with self.db.atomic():
            self.db.execute("UPDATE messages SET sources = ? WHERE id = ?", [json.dumps(sources), message_id])

    def edit_message(self, message_id: int, content: str) -> None:
        with self.db.atomic():
            self.db.execute("UPDATE messages SET content = ? WHERE id = ?", [content, message_id])

    def delete_messages_from(self, chat_id: int, message_id: int) -> None:
        """Drop a message and everything stored after it in its chat; what it followed is shown."""
        with self.db.atomic():
            parent = self.db.execute("SELECT parent_id FROM messages WHERE id = ?", [message_id]).fetchone()
            self.db.execute("DELETE FROM messages WHERE chat_id = ? AND id >= ?", [chat_id, message_id])
            self.db.execute("UPDATE chats SET leaf_id = ? WHERE id = ?", [parent and parent[0], chat_id])

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Messages of every chat containing all the words of `text` (the last one as a prefix, so results
        come while typing), best match first (FTS5's bm25), each with its chat's title and a snippet.
        The words are quoted, so no text the user types is FTS5 syntax or an error."""
        query = fts_match(text)
        if not query:
            return []
        rows = self.db.query(
            "SELECT m.id, m.chat_id, m.role, c.title, "
            "snippet(messages_fts, 0, ?, ?, '…', 12) AS snippet "
            "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid JOIN chats c ON c.id = m.chat_id "
            "WHERE messages_fts MATCH ? ORDER BY bm25(messages_fts), m.id DESC LIMIT ?",
            [MATCH_START, MATCH_END, query, limit],
        )
        return [
            SearchHit(r["id"], r["chat_id"], r["title"], r["role"], " ".join(r["snippet"].split()))
            for r in rows
        ]

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]
