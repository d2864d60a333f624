"""The chat database's schema, as forward migrations: `UPGRADES[i]` takes a database at version i to i + 1.

The version is SQLite's `PRAGMA user_version`. A migration is only ever appended, never edited, so a
database written by any earlier ripelm upgrades in order; one from a newer ripelm is refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ripelm.chat_store.connection import Database


def _v1_chats_and_messages(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            model TEXT,
            draft TEXT,
            system TEXT,
            params TEXT NOT NULL DEFAULT '{}',
            collection TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )"""
    )
    conn.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'done',
            created REAL NOT NULL,
            stats TEXT
        )"""
    )
    conn.execute("CREATE INDEX messages_by_chat ON messages(chat_id, id)")


def _v2_sources(conn: sqlite3.Connection) -> None:
    """Document Q&A answers keep the passages they cite (JSON list), so citations resolve after a restart."""
    conn.execute("ALTER TABLE messages ADD COLUMN sources TEXT")
    conn.execute("CREATE INDEX chats_by_updated ON chats(updated)")


def _v3_ids_never_reused(conn: sqlite3.Connection) -> None:
    """Chat and message ids come from AUTOINCREMENT, so an id is never handed out again after a delete (a
    plain INTEGER PRIMARY KEY takes max(id) + 1: deleting the newest message gave its id to the next one).

    SQLite cannot add AUTOINCREMENT to a table, so both tables are rebuilt (SQLite's documented order:
    create the new table, copy, drop the old, rename) with their rows and ids as they were. Copying the rows
    sets `sqlite_sequence` to the largest id; an id deleted before this migration above that largest id is
    not known and may be given once more. `upgrade` turns foreign keys off around this, or dropping `chats`
    would cascade into `messages`.
    """
    conn.execute(
        """CREATE TABLE chats_v3 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL,
            model TEXT,
            draft TEXT,
            system TEXT,
            params TEXT NOT NULL DEFAULT '{}',
            collection TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )"""
    )
    conn.execute(
        "INSERT INTO chats_v3 (id, title, model, draft, system, params, collection, created, updated) "
        "SELECT id, title, model, draft, system, params, collection, created, updated FROM chats"
    )
    conn.execute(
        """CREATE TABLE messages_v3 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'done',
            created REAL NOT NULL,
            stats TEXT,
            sources TEXT
        )"""
    )
    conn.execute(
        "INSERT INTO messages_v3 (id, chat_id, role, content, state, created, stats, sources) "
        "SELECT id, chat_id, role, content, state, created, stats, sources FROM messages"
    )
    conn.execute("DROP TABLE messages")  # drops its index messages_by_chat too
    conn.execute("DROP TABLE chats")  # and chats_by_updated
    conn.execute("ALTER TABLE chats_v3 RENAME TO chats")
    conn.execute("ALTER TABLE messages_v3 RENAME TO messages")
    conn.execute("CREATE INDEX messages_by_chat ON messages(chat_id, id)")
    conn.execute("CREATE INDEX chats_by_updated ON chats(updated)")


def _v4_message_search(conn: sqlite3.Connection) -> None:
    """Full-text search over every message (SQLite's FTS5), an external-content index over `messages` kept
    in step by triggers, so a message is findable as soon as it is stored (a streaming reply at each
    checkpoint). Messages stored before this migration are indexed by the rebuild."""
    conn.execute(
        "CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id', "
        "tokenize='unicode61 remove_diacritics 2')"
    )
    conn.execute(
        "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN "
        "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END"
    )
    conn.execute(
        "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); END"
    )
    conn.execute(
        "CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); "
        "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END"
    )
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")


def _v5_branches(conn: sqlite3.Connection) -> None:
    """Branches: a chat's messages form a tree. Each message names the one it follows (`parent_id`; NULL:
    the first), so an edited message or a regenerated reply is a sibling of the version it replaces and
    both are kept; `chats.leaf_id` is the last message of the branch shown. A chat from before this
    migration is one branch: each message follows the one before it."""
    conn.execute("ALTER TABLE messages ADD COLUMN parent_id INTEGER")
    conn.execute(
        "UPDATE messages SET parent_id = (SELECT max(p.id) FROM messages p "
        "WHERE p.chat_id = messages.chat_id AND p.id < messages.id)"
    )
    conn.execute("ALTER TABLE chats ADD COLUMN leaf_id INTEGER")
    conn.execute("UPDATE chats SET leaf_id = (SELECT max(id) FROM messages WHERE chat_id = chats.id)")
    conn.execute("CREATE INDEX messages_by_parent ON messages(parent_id)")


def _v6_memories(conn: sqlite3.Connection) -> None:
    """Memories: facts and preferences about the user, kept across chats, each with where it was said
    (`chat_id`, `message_id`; NULL once that chat or message is deleted, or for one saved outside a stored
    chat). `vector` is the memory's embedding (float32, unit length) by the embedder named in `embedder`
    (its fingerprint), filled in when one is available; an FTS5 index kept in step by triggers gives the
    BM25 side of the hybrid search. `chats.memory` = 0 turns memory off for that chat."""
    conn.execute(
        """CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            content TEXT NOT NULL,
            chat_id INTEGER REFERENCES chats(id) ON DELETE SET NULL,
            message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            embedder TEXT,
            vector BLOB
        )"""
    )
    conn.execute("CREATE INDEX memories_by_chat ON memories(chat_id)")
    conn.execute("CREATE INDEX memories_by_message ON memories(message_id)")
    conn.execute(
        "CREATE VIRTUAL TABLE memories_fts USING fts5(content, content='memories', content_rowid='id', "
        "tokenize='unicode61 remove_diacritics 2')"
    )
    conn.execute(
        "CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN "
        "INSERT INTO memories_fts(rowid, content) VALUES (new.id, new.content); END"
    )
    conn.execute(
        "CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN "
        "INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', old.id, old.content); END"
    )
    conn.execute(
        "CREATE TRIGGER memories_fts_update AFTER UPDATE OF content ON memories BEGIN "
        "INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', old.id, old.content); "
        "INSERT INTO memories_fts(rowid, content) VALUES (new.id, new.content); END"
    )
    conn.execute("ALTER TABLE chats ADD COLUMN memory INTEGER NOT NULL DEFAULT 1")


def _v7_message_vectors(conn: sqlite3.Connection) -> None:
    """Dense search over messages: each message's embedding (float32, unit length) by the embedder named in
    `embedder` (its fingerprint), made in the background by the chat app where an embedder is available.
    A vector goes with its message: deleting the message (or its chat) deletes it (ON DELETE CASCADE), and
    a trigger drops it when the message's text changes (an edit; a reply streamed over it), so a stale
    vector is never searched; the app embeds the new text. Messages stored before this have no vector yet
    and are embedded the same way."""
    conn.execute(
        """CREATE TABLE message_vectors (
            message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
            embedder TEXT NOT NULL,
            vector BLOB NOT NULL
        )"""
    )
    conn.execute(
        "CREATE TRIGGER message_vectors_stale AFTER UPDATE OF content ON messages "
        "WHEN old.content IS NOT new.content BEGIN "
        "DELETE FROM message_vectors WHERE message_id = old.id; END"
    )


UPGRADES: list[Callable[[sqlite3.Connection], None]] = [
    _v1_chats_and_messages,
    _v2_sources,
    _v3_ids_never_reused,
    _v4_message_search,
    _v5_branches,
    _v6_memories,
    _v7_message_vectors,
]
SCHEMA_VERSION = len(UPGRADES)


def schema_version(db: Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def upgrade(db: Database, to: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations, each with its version bump in one transaction; the old version.

    Foreign keys are off while they run (the pragma is a no-op inside a transaction, so it is set around
    them): a migration that rebuilds a table must not cascade its DROP into the rows that point at it."""
    start = schema_version(db)
    if start >= to:
        return start
    keys_were_on = db.execute("PRAGMA foreign_keys").fetchone()[0]
    db.execute("PRAGMA foreign_keys=OFF")
    try:
        for version in range(start, to):
            with db.atomic(immediate=True):  # the migration and the new version commit together, or neither
                if schema_version(db) > version:  # another process (a second `ripe chat`) got there first
                    continue
                UPGRADES[version](db.conn)
                db.execute(f"PRAGMA user_version = {version + 1}")
    finally:
        if keys_were_on:
            db.execute("PRAGMA foreign_keys=ON")
    return start
