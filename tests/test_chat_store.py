"""The chat store on real SQLite: CRUD, search, partial replies, migrations, a newer schema refused."""

from __future__ import annotations

import sqlite3

import pytest

from ripelm.chat_store import ChatStore, ChatStoreError
from ripelm.chat_store.connection import Database
from ripelm.chat_store.records import CANCELLED, DONE, PARTIAL
from ripelm.chat_store.upgrades import SCHEMA_VERSION, UPGRADES, upgrade


@pytest.fixture
def store(tmp_path):
    s = ChatStore(tmp_path / "chats.db")
    yield s
    s.close()


def test_chats_crud_and_search(store):
    a = store.new_chat("Rust lifetimes", model="smollm2:135m", params={"temperature": 0.2})
    b = store.new_chat("Pasta recipes", system="You are a chef.")
    assert store.chat(a.id).params == {"temperature": 0.2}
    assert store.chat(b.id).system == "You are a chef."
    assert [c.id for c in store.chats()] == [b.id, a.id]  # most recent first
    assert [c.id for c in store.chats("RUST")] == [a.id]
    store.rename_chat(a.id, "  Borrow   checker ")
    assert store.chat(a.id).title == "Borrow checker"
    assert [c.id for c in store.chats()][0] == a.id  # touched: now the most recent
    with pytest.raises(ChatStoreError):
        store.rename_chat(a.id, "   ")
    store.add_message(a.id, "user", "hi")
    store.delete_chat(a.id)
    with pytest.raises(ChatStoreError):
        store.chat(a.id)
    assert store.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_messages_and_partial_reply(store, tmp_path):
    c = store.new_chat()
    u = store.add_message(c.id, "user", "What is 2+2?")
    r = store.start_reply(c.id)
    assert r.state == PARTIAL and r.content == ""
    store.save_reply(r.id, "It is")
    store.save_reply(r.id, "It is 4.", state=DONE, stats={"decode_tok_s": 12.5})
    msgs = store.messages(c.id)
    assert [(m.role, m.content, m.state) for m in msgs] == [
        ("user", "What is 2+2?", DONE),
        ("assistant", "It is 4.", DONE),
    ]
    assert msgs[1].stats == {"decode_tok_s": 12.5}
    # another connection (a restarted app) sees it
    again = ChatStore(tmp_path / "chats.db")
    assert [m.content for m in again.messages(c.id)] == ["What is 2+2?", "It is 4."]
    again.close()
    store.delete_messages_from(c.id, r.id)
    assert [m.id for m in store.messages(c.id)] == [u.id]
    store.save_reply(store.start_reply(c.id).id, "cut", state=CANCELLED)
    assert store.messages(c.id)[-1].state == CANCELLED


def test_wal_and_synchronous(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.integrity() == "ok"


def test_only_streaming_checkpoints_commit_without_a_flush(store):
    """Each COMMIT with the synchronous level it ran under: FULL (flushed) for a sent message, a new chat
    and a finished reply, NORMAL for the checkpoints of a reply that is still streaming."""
    level = ["FULL"]
    commits: list[str] = []

    def trace(sql: str) -> None:
        words = sql.upper().replace("=", " ").split()
        if words[:2] == ["PRAGMA", "SYNCHRONOUS"] and len(words) == 3:
            level[0] = words[2]
        elif words[:1] == ["COMMIT"]:
            commits.append(level[0])

    store.db.conn.set_trace_callback(trace)
    c = store.new_chat()
    store.add_message(c.id, "user", "hello")
    r = store.start_reply(c.id)
    store.save_reply(r.id, "Hel")
    store.save_reply(r.id, "Hello th")
    store.save_reply(r.id, "Hello there.", state=DONE)
    store.rename_chat(c.id, "greetings")
    store.db.conn.set_trace_callback(None)
    assert commits == ["FULL", "FULL", "FULL", "NORMAL", "NORMAL", "FULL", "FULL"]
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert store.message(r.id).content == "Hello there."


def test_edit_and_regenerate_keep_the_old_version_as_a_branch(store, tmp_path):
    """Edit-and-resend and regenerate add a sibling of the replaced message in one COMMIT (the insert and
    the chat's new leaf together); the old version and what followed it stay, and switching restores it."""
    c = store.new_chat()
    q = store.add_message(c.id, "user", "first question")
    a = store.add_message(c.id, "assistant", "first answer")
    q2 = store.add_message(c.id, "user", "follow-up")
    a2 = store.add_message(c.id, "assistant", "follow-up answer")
    statements: list[str] = []
    store.db.conn.set_trace_callback(lambda sql: statements.append(sql.split()[0].upper()))
    edited = store.add_message(c.id, "user", "better question", replace_from=q.id)
    store.db.conn.set_trace_callback(None)
    writes = [s for s in statements if s in ("BEGIN", "DELETE", "INSERT", "UPDATE", "COMMIT")]
    writes = [s for i, s in enumerate(writes) if i == 0 or s != writes[i - 1]]  # triggers repeat theirs
    assert writes == ["BEGIN", "INSERT", "UPDATE", "COMMIT"]
    regen = store.start_reply(c.id)
    store.save_reply(regen.id, "better answer", state=DONE)
    again = store.start_reply(c.id, replace_from=regen.id)  # regenerate on the new branch
    assert [m.id for m in store.messages(c.id)] == [edited.id, again.id]
    assert store.versions(c.id) == {edited.id: [q.id, edited.id], again.id: [regen.id, again.id]}

    # back to the first version of the question: its whole branch returns
    assert [m.id for m in store.switch_to(q.id)] == [q.id, a.id, q2.id, a2.id]
    store.close()
    reopened = ChatStore(tmp_path / "chats.db")  # the branch shown survives a restart
    assert [m.content for m in reopened.messages(c.id)][:2] == ["first question", "first answer"]
    assert [m.id for m in reopened.switch_to(edited.id)] == [edited.id, again.id]  # newest version below
    with pytest.raises(ChatStoreError):
        reopened.add_message(c.id, "user", "x", replace_from=10_000)
    reopened.close()


def test_forward_migration_keeps_data(tmp_path):
    path = tmp_path / "old.db"
    db = Database(path)
    upgrade(db, to=1)  # a database as the first release wrote it
    db.execute("INSERT INTO chats (title, params, created, updated) VALUES ('old chat', '{}', 1.0, 1.0)")
    db.execute(
        "INSERT INTO messages (chat_id, role, content, state, created) "
        "VALUES (1, 'user', 'hello', 'done', 1.0)"
    )
    db.conn.commit()
    db.close()
    store = ChatStore(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(UPGRADES)
    assert [m.content for m in store.messages(1)] == ["hello"]
    m = store.add_message(1, "assistant", "cited [1]", sources=[{"where": "a.txt:1-3"}])
    assert store.message(m.id).sources == [{"where": "a.txt:1-3"}]
    store.close()


# The schema as ripelm wrote it at version 2 (before AUTOINCREMENT), spelled out so this test keeps
# building the old database whatever later migrations do.
V2_SCHEMA = [
    """CREATE TABLE chats (
        id INTEGER PRIMARY KEY, title TEXT NOT NULL, model TEXT, draft TEXT, system TEXT,
        params TEXT NOT NULL DEFAULT '{}', collection TEXT, created REAL NOT NULL, updated REAL NOT NULL
    )""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY, chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL, content TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'done', created REAL NOT NULL,
        stats TEXT
    )""",
    "CREATE INDEX messages_by_chat ON messages(chat_id, id)",
    "ALTER TABLE messages ADD COLUMN sources TEXT",
    "CREATE INDEX chats_by_updated ON chats(updated)",
    "PRAGMA user_version = 2",
]


def test_ids_are_not_reused_after_a_delete(store):
    c = store.new_chat()
    store.add_message(c.id, "user", "q")
    last = store.add_message(c.id, "assistant", "a")
    store.delete_messages_from(c.id, last.id)
    assert store.add_message(c.id, "assistant", "a again").id > last.id
    gone = store.new_chat("newest")
    store.delete_chat(gone.id)
    assert store.new_chat().id > gone.id


def test_migration_from_v2_keeps_data_and_stops_id_reuse(tmp_path):
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    for sql in V2_SCHEMA:
        conn.execute(sql)
    conn.execute(
        "INSERT INTO chats (id, title, model, system, params, collection, created, updated) "
        "VALUES (1, 'kept', 'smollm2:135m', 'be brief', '{\"temperature\": 0.2}', 'notes', 1.0, 2.0), "
        "(2, 'other', NULL, NULL, '{}', NULL, 3.0, 4.0)"
    )
    conn.execute(
        "INSERT INTO messages (id, chat_id, role, content, state, created, stats, sources) VALUES "
        "(1, 1, 'user', 'hello', 'done', 1.0, NULL, NULL), "
        "(2, 1, 'assistant', 'hi [1]', 'done', 1.5, '{\"decode_tok_s\": 9.5}', "
        '\'[{"where": "a.txt:1-3"}]\'), '
        "(5, 2, 'user', 'gap before me', 'done', 3.0, NULL, NULL), "
        "(6, 2, 'assistant', 'cut off', 'partial', 3.5, NULL, NULL)"
    )
    conn.commit()
    conn.close()

    store = ChatStore(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.integrity() == "ok"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # back on after the rebuild
    kept = store.chat(1)
    assert (kept.title, kept.model, kept.system, kept.params) == (
        "kept",
        "smollm2:135m",
        "be brief",
        {"temperature": 0.2},
    )
    assert (kept.collection, kept.created, kept.updated) == ("notes", 1.0, 2.0)
    assert [(m.id, m.role, m.content, m.state) for m in store.messages(1)] == [
        (1, "user", "hello", DONE),
        (2, "assistant", "hi [1]", DONE),
    ]
    assert store.message(2).stats == {"decode_tok_s": 9.5}
    assert store.message(2).sources == [{"where": "a.txt:1-3"}]
    assert [(m.id, m.state) for m in store.messages(2)] == [(5, DONE), (6, PARTIAL)]

    # Deleting the newest message used to hand its id to the next one (max(id) + 1); now it never comes back.
    store.delete_messages_from(2, 6)
    assert store.add_message(2, "assistant", "again").id == 7
    with store.db.atomic():  # the foreign key's cascade still works after the rebuild
        store.db.execute("DELETE FROM chats WHERE id = 2")
    assert store.db.execute("SELECT count(*) FROM messages WHERE chat_id = 2").fetchone()[0] == 0
    assert store.new_chat("after").id == 3
    assert [m.id for m in store.messages(1)] == [1, 2]
    store.close()
    again = ChatStore(path)  # reopening does not migrate again
    assert again.add_message(1, "user", "later").id == 8
    again.close()


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ChatStoreError, match="newer"):
        ChatStore(path)


def test_search_all_messages_full_text(tmp_path):
    db = tmp_path / "chats.db"
    conn = Database(db)
    upgrade(conn, to=3)  # a database from before the search index
    conn.execute("INSERT INTO chats (title, created, updated) VALUES ('Old trip', 1, 1)")
    conn.execute(
        "INSERT INTO messages (chat_id, role, content, created) "
        "VALUES (1, 'user', 'Kyoto temples in autumn?', 1)"
    )
    conn.close()
    store = ChatStore(db)  # migrates: the old message is indexed
    other = store.new_chat("Cooking")
    store.add_message(other.id, "user", "How long do I boil an egg?")
    reply = store.start_reply(other.id)
    store.save_reply(reply.id, "About nine minutes for a hard-boiled egg.", state=DONE)

    (hit,) = store.search("kyoto")
    assert (hit.chat_id, hit.chat_title, hit.role) == (1, "Old trip", "user")
    assert "\x02Kyoto\x03" in hit.snippet
    assert {h.chat_id for h in store.search("egg")} == {other.id}
    assert [h.message_id for h in store.search("nine min")] == [reply.id]  # a streaming reply, by prefix
    assert store.search('boil" OR "x') == [] and store.search("AND (") == []  # typed text is never syntax
    store.delete_chat(other.id)
    assert store.search("egg") == [] and store.integrity() == "ok"
    store.close()
