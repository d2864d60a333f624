"""The chat store's message vectors: the dense side of the search over all messages (`message_vectors`,
schema v7), and the BM25 scores and hits the hybrid search (ripelm.message_search) fuses them with.

A mixin of `ChatStore` (store.py), which owns the connection. Vectors are derived data: losing one to a
power cut only means the message is embedded again, so they commit without a disk flush
(`synchronous=NORMAL`), as a streaming reply's checkpoints do; the next FULL commit flushes them along.
"""

from __future__ import annotations

from typing import Any

from ripelm.chat_store.records import PARTIAL, SearchHit

EMBEDDED_ROLES = ("user", "assistant")  # tool results and system text are not what a user searches for
EXCERPT_CHARS = 160  # a hit found by meaning alone shows the message's start (no matched words to show)


def fts_match(text: str) -> str:
    """An FTS5 query for the words of `text`: all of them, the last one as a prefix, each quoted so that
    nothing the user types is FTS5 syntax or an error; "" for no words."""
    words = [w.replace('"', '""') for w in text.split()]
    return " ".join(f'"{w}"' for w in words) + "*" if words else ""


class MessageVectorRecords:
    db: Any  # the Database (chat_store.connection) of ChatStore

    def messages_to_embed(
        self, embedder: str, limit: int = 16, below: int | None = None
    ) -> list[tuple[int, str]]:
        """(id, text) of finished user and assistant messages that have no vector by `embedder` (new,
        edited, or embedded by another embedder), newest first: recent chats become searchable first.
        `below`: only ids under it (a pass goes on from where its last batch ended instead of walking
        again over every message it has embedded)."""
        rows = self.db.execute(
            "SELECT m.id, m.content FROM messages m LEFT JOIN message_vectors v "
            "ON v.message_id = m.id AND v.embedder = ? "
            "WHERE m.id < ? AND v.message_id IS NULL AND m.state != ? AND m.content != '' "
            f"AND m.role IN ({', '.join('?' * len(EMBEDDED_ROLES))}) ORDER BY m.id DESC LIMIT ?",
            [embedder, (1 << 62) if below is None else below, PARTIAL, *EMBEDDED_ROLES, limit],
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def set_message_vectors(self, embedder: str, made: list[tuple[int, str, bytes]]) -> int:
        """Store (id, text embedded, vector) rows in one transaction; a row whose message is gone or whose
        text changed meanwhile (an edit while it was being embedded) is skipped. Returns how many stored."""
        if not made:
            return 0
        stored = 0
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self.db.atomic():
                for msg_id, text, vector in made:
                    cur = self.db.execute(
                        "INSERT OR REPLACE INTO message_vectors (message_id, embedder, vector) "
                        "SELECT id, ?, ? FROM messages WHERE id = ? AND content = ? AND state != ?",
                        [embedder, vector, msg_id, text, PARTIAL],
                    )
                    stored += cur.rowcount
        finally:
            self.db.execute("PRAGMA synchronous=FULL")
        return stored

    def message_vectors(self, embedder: str) -> list[tuple[int, bytes]]:
        """Every stored (message id, vector) by `embedder`."""
        rows = self.db.execute(
            "SELECT message_id, vector FROM message_vectors WHERE embedder = ? ORDER BY message_id",
            [embedder],
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def search_bm25(self, text: str, limit: int = 50) -> dict[int, float]:
        """Message id -> BM25 score (higher is better) of the messages `search` finds for `text`."""
        match = fts_match(text)
        if not match:
            return {}
        rows = self.db.execute(
            "SELECT rowid, -bm25(messages_fts) FROM messages_fts WHERE messages_fts MATCH ? "
            "ORDER BY bm25(messages_fts), rowid DESC LIMIT ?",
            [match, limit],
        ).fetchall()
        return {r[0]: float(r[1]) for r in rows}

    def hits_for(self, message_ids: list[int]) -> dict[int, SearchHit]:
        """Search hits for messages found by meaning: each with its chat and the start of its text as the
        snippet. A message deleted since its vector was read is left out."""
        if not message_ids:
            return {}
        rows = self.db.execute(
            "SELECT m.id, m.chat_id, m.role, c.title, substr(m.content, 1, ?) FROM messages m "
            f"JOIN chats c ON c.id = m.chat_id WHERE m.id IN ({', '.join('?' * len(message_ids))})",
            [EXCERPT_CHARS * 2, *message_ids],
        ).fetchall()
        out = {}
        for mid, chat_id, role, title, text in rows:
            text = " ".join(text.split())
            snippet = text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1].rstrip() + "…"
            out[mid] = SearchHit(mid, chat_id, title, role, snippet)
        return out
