"""The chat database's schema, as forward migrations: `UPGRADES[i]` takes a database at version i to i + 1.

The version is SQLite's `PRAGMA user_version`. A migration is only ever appended, never edited, so a
database written by any earlier ripelm upgrades in order; one from a newer ripelm is refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import sqlite_utils


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


UPGRADES: list[Callable[[sqlite3.Connection], None]] = [_v1_chats_and_messages, _v2_sources]
SCHEMA_VERSION = len(UPGRADES)


def schema_version(db: sqlite_utils.Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def upgrade(db: sqlite_utils.Database, to: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations, each with its version bump in one transaction; the old version."""
    start = schema_version(db)
    for version in range(start, to):
        with db.atomic():  # the migration and the new version commit together, or neither does
            UPGRADES[version](db.conn)
            db.execute(f"PRAGMA user_version = {version + 1}")
    return start
