"""The chat store's SQLite connection: the standard library's `sqlite3` with the few helpers the store uses.

Why not sqlite-utils here (the document store keeps it): importing it imports numpy and scans the
installed packages for plugins, ~0.25 s of a chat app launch that must show its input box within 1 s,
for nothing the chat store needs beyond a transaction helper and rows as dicts.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Database:
    """One connection in autocommit mode: a statement outside `atomic()` commits by itself (as
    sqlite-utils' `execute` does); `atomic()` opens the transactions explicitly."""

    def __init__(self, path: str | Path):
        self.conn = sqlite3.connect(str(path), isolation_level=None)
        self.conn.execute("PRAGMA recursive_triggers=on")

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Iterator[dict[str, Any]]:
        """The rows of a SELECT as dicts keyed by column name (fetched lazily)."""
        cursor = self.conn.execute(sql, params)
        names = [d[0] for d in cursor.description or ()]
        return (dict(zip(names, row, strict=True)) for row in cursor)

    @contextmanager
    def atomic(self, immediate: bool = False) -> Iterator[Database]:
        """One transaction around the block (a savepoint when one is already open): all of it commits,
        or on any exception none of it does. `immediate`: it takes the write lock at once (so what it
        reads cannot change before it writes)."""
        if self.conn.in_transaction:
            name = f"ripe_{secrets.token_hex(8)}"
            self.conn.execute(f"SAVEPOINT {name}")
            try:
                yield self
            except BaseException:
                if self.conn.in_transaction:  # a RAISE(ROLLBACK) may already have ended it
                    self.conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                    self.conn.execute(f"RELEASE SAVEPOINT {name}")
                raise
            self.conn.execute(f"RELEASE SAVEPOINT {name}")
            return
        self.conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield self
        except BaseException:
            self.conn.rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.rollback()
            raise

    @contextmanager
    def ensure_autocommit_on(self) -> Iterator[None]:
        """No implicit transactions inside the block (for pragmas such as journal_mode that refuse one)."""
        if self.conn.in_transaction:
            raise sqlite3.OperationalError("cannot switch to autocommit inside a transaction")
        old = self.conn.isolation_level
        self.conn.isolation_level = None
        try:
            yield
        finally:
            self.conn.isolation_level = old

    def close(self) -> None:
        self.conn.close()
