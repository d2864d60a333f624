"""The chat store's memories: facts and preferences about the user, each with its chat and message.

A mixin of `ChatStore` (store.py), which owns the connection. The same durability rules as messages:
every write is one transaction committed with `synchronous=FULL`, so a memory whose save returned
survives a SIGKILL and a power cut, and a killed save leaves either the whole memory or nothing.
"""

from __future__ import annotations

import time
from typing import Any

from ripelm.chat_store.records import Memory
from ripelm.errors import ChatStoreError

MAX_MEMORY_CHARS = 1000  # one memory is a fact, not a document


def _memory(row: Any) -> Memory:
    return Memory(
        id=row["id"],
        content=row["content"],
        chat_id=row["chat_id"],
        message_id=row["message_id"],
        created=row["created"],
        updated=row["updated"],
        embedder=row["embedder"],
        vector=row["vector"],
    )


def clean_memory(text: str) -> str:
    """One line, no runs of spaces; an empty or overlong memory is refused (one error line)."""
    text = " ".join(text.split())
    if not text:
        raise ChatStoreError("a memory cannot be empty")
    if len(text) > MAX_MEMORY_CHARS:
        raise ChatStoreError(f"a memory is at most {MAX_MEMORY_CHARS} characters (this one has {len(text)})")
    return text


class MemoryRecords:
    db: Any  # the Database (chat_store.connection) of ChatStore

    def add_memory(self, content: str, chat_id: int | None = None, message_id: int | None = None) -> Memory:
        """Store a memory (one transaction). The same text already stored (any case) is not stored twice:
        the existing memory is returned."""
        content = clean_memory(content)
        now = time.time()
        with self.db.atomic():
            same = self.db.execute(
                "SELECT id FROM memories WHERE lower(content) = lower(?)", [content]
            ).fetchone()
            if same is not None:
                mem_id = same[0]
            else:
                self.db.execute(
                    "INSERT INTO memories (content, chat_id, message_id, created, updated) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [content, chat_id, message_id, now, now],
                )
                mem_id = self.db.execute("SELECT last_insert_rowid()").fetchone()[0]
        return self.memory(mem_id)

    def memory(self, memory_id: int) -> Memory:
        rows = list(self.db.query("SELECT * FROM memories WHERE id = ?", [memory_id]))
        if not rows:
            raise ChatStoreError(f"no memory with id {memory_id}")
        return _memory(rows[0])

    def memories(self) -> list[Memory]:
        """Every memory, oldest first."""
        return [_memory(r) for r in self.db.query("SELECT * FROM memories ORDER BY id")]

    def edit_memory(self, memory_id: int, content: str) -> Memory:
        """New text for a memory; its vector is dropped (it described the old text) and made again."""
        content = clean_memory(content)
        self.memory(memory_id)
        with self.db.atomic():
            self.db.execute(
                "UPDATE memories SET content = ?, updated = ?, embedder = NULL, vector = NULL WHERE id = ?",
                [content, time.time(), memory_id],
            )
        return self.memory(memory_id)

    def delete_memory(self, memory_id: int) -> Memory:
        """Forget a memory for good; returns what it was."""
        gone = self.memory(memory_id)
        with self.db.atomic():
            self.db.execute("DELETE FROM memories WHERE id = ?", [memory_id])
        return gone

    def set_memory_vector(self, memory_id: int, embedder: str, vector: bytes, content: str) -> None:
        """Store a memory's embedding, unless its text changed since it was embedded (an edit meanwhile)."""
        with self.db.atomic():
            self.db.execute(
                "UPDATE memories SET embedder = ?, vector = ? WHERE id = ? AND content = ?",
                [embedder, vector, memory_id, content],
            )

    def memory_bm25(self, match: str, limit: int = 50) -> dict[int, float]:
        """Memory id -> BM25 score (higher is better) for an FTS5 MATCH expression (search.fts_query)."""
        if not match:
            return {}
        rows = self.db.execute(
            "SELECT rowid, -bm25(memories_fts) FROM memories_fts WHERE memories_fts MATCH ? "
            "ORDER BY bm25(memories_fts) LIMIT ?",
            [match, limit],
        ).fetchall()
        return {r[0]: float(r[1]) for r in rows}
