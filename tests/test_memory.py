"""Memory: the store (migration, provenance, edit, delete, durability settings), the first-person
statement detector, the commands, and recall by the hybrid search into a prompt within the token budget
(real SQLite, the real bundled embedder)."""

from __future__ import annotations

import sqlite3

import pytest
from retrieval_helpers import make_home

from ripelm.chat_store import ChatStore, ChatStoreError
from ripelm.chat_store.upgrades import SCHEMA_VERSION
from ripelm.config import ConfigError, load_config
from ripelm.memory import detect_memories, remember_statements, save_memory
from ripelm.memory_commands import parse, run
from ripelm.memory_recall import HEADER, MemoryEmbedder, gather, rank, recall, with_memories


@pytest.mark.parametrize(
    ("said", "facts"),
    [
        ("Hi! My name is Sam.", ["The user's name is Sam."]),
        ("call me sam", ["The user's name is Sam."]),
        ("I'm vegetarian.", ["The user is vegetarian."]),
        ("My project uses Postgres", ["The user's project uses Postgres."]),
        ("I prefer tabs over spaces. Now write a loop.", ["The user prefers tabs over spaces."]),
        ("I am a teacher from Lyon.", ["The user is a teacher from Lyon."]),
        ("I'm Sam", ["The user's name is Sam."]),
        ("I'm tired", []),
        ("I'm going to the store", []),
        ("What is my name?", []),
        ("I have a question about Python.", []),
        ("My code is broken again.", []),
        ("I'm a bit confused", []),
        ("I have two cats.", ["The user has two cats."]),
        ("Write a long story about a dragon.", []),
    ],
)
def test_detector_takes_first_person_facts_only(said, facts):
    assert detect_memories(said) == facts


def test_memories_with_provenance_edit_delete(tmp_path):
    store = ChatStore(tmp_path / "chats.db")
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    chat = store.new_chat("Intro")
    msg = store.add_message(chat.id, "user", "Call me Sam. I'm vegetarian.")
    saved = remember_statements(store, msg.content, chat.id, msg.id)
    assert [(s.memory.content, s.new) for s in saved] == [
        ("The user's name is Sam.", True),
        ("The user is vegetarian.", True),
    ]
    assert all(s.memory.chat_id == chat.id and s.memory.message_id == msg.id for s in saved)
    again = remember_statements(store, "call me sam", chat.id, msg.id)  # the same fact: not stored twice
    assert [s.new for s in again] == [False] and len(store.memories()) == 2

    sam = saved[0].memory
    edited = store.edit_memory(sam.id, "  The user's name is   Samantha. ")
    assert edited.content == "The user's name is Samantha." and edited.vector is None
    assert store.memory_bm25('"samantha"') and not store.memory_bm25('"sam"')  # the FTS index follows
    store.delete_memory(sam.id)
    with pytest.raises(ChatStoreError, match="no memory"):
        store.memory(sam.id)
    assert not store.memory_bm25('"samantha"')
    with pytest.raises(ChatStoreError, match="empty"):
        save_memory(store, "   ", chat.id, None)

    # provenance: deleting the chat keeps the memory, without a source
    store.delete_chat(chat.id)
    (left,) = store.memories()
    assert left.content == "The user is vegetarian." and left.chat_id is None and left.message_id is None
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a saved memory is flushed
    store.close()


def test_commands(tmp_path):
    store = ChatStore(tmp_path / "chats.db")
    chat = store.new_chat("c")
    msg = store.add_message(chat.id, "user", "hello")
    kw = {"chat_id": chat.id, "message_id": msg.id, "enabled": True, "chat_memory": True}
    assert parse("hello /remember") is None and parse("/Remember  x y") == ("/remember", "x y")
    r = run(store, "/remember", "I like green tea", **kw)
    assert not r.error and r.memory.content == "I like green tea" and r.memory.message_id == msg.id
    run(store, "/remember", "My cat is called Tom", **kw)
    assert "#1 I like green tea" in run(store, "/memories", "", **kw).text
    assert run(store, "/forget", "nothing like this", **kw).error
    r = run(store, "/forget", "tea", **kw)
    assert r.memory.id == 1 and [m.content for m in store.memories()] == ["My cat is called Tom"]
    assert run(store, "/forget", "#99", **kw).error
    assert run(store, "/memory", "off", **kw).toggle is False
    assert run(store, "/remember", "x", **{**kw, "enabled": False}).error
    store.close()


def test_config_memory_section(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[memory]\nenabled = false\nbudget_tokens = 64\n")
    cfg = load_config(path)
    assert (cfg.memory.enabled, cfg.memory.budget_tokens, cfg.memory.auto) == (False, 64, True)
    assert load_config(tmp_path / "none.toml").memory.enabled
    path.write_text("[memory]\nbudget = 3\n")
    with pytest.raises(ConfigError, match="memory.budget"):
        load_config(path)


def test_recall_hybrid_within_budget(tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("RIPELM_HOME", str(home))
    store = ChatStore(home / "chats.db")
    chat = store.new_chat("facts")
    for text in ("The user's name is Sam.", "The user is vegetarian.", "The user's project uses Postgres."):
        save_memory(store, text, chat.id, None)
    embedder = MemoryEmbedder()
    assert embedder.get() is not None, embedder.error
    words = lambda text: len(text.split())  # noqa: E731  (a whitespace tokenizer for the budget)

    # BM25 and dense agree: the name first
    got = recall(store, "What is my name?", embedder.get(), words, budget=200)
    assert got and got[0].content == "The user's name is Sam."
    # vectors were made and stored on the way, with the embedder's fingerprint
    fp = embedder.get().info.fingerprint
    assert all(m.vector is not None and m.embedder == fp for m in store.memories())
    # dense alone: no word in common with "vegetarian"
    ranked = rank(gather(store, "Suggest a dinner recipe without meat"), embedder.get())
    assert ranked.memories and ranked.memories[0].content == "The user is vegetarian."
    # an unrelated question recalls nothing
    assert recall(store, "How far away is the moon?", embedder.get(), words, budget=200) == []
    # the budget: the header and one memory fit, two do not
    one = len(HEADER.split()) + 1 + len("The user's name is Sam.".split())
    both = recall(store, "name project", embedder.get(), words, budget=200)
    assert {m.content for m in both[:2]} == {"The user's name is Sam.", "The user's project uses Postgres."}
    assert recall(store, "name project", embedder.get(), words, budget=one) == both[:1]
    assert recall(store, "name", embedder.get(), words, budget=3) == []

    chat_turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is my name?"},
    ]
    sent = with_memories(chat_turns, got[:1])
    assert sent[:3] == chat_turns[:3]  # the earlier turns as they were: the prefix cache still holds them
    assert sent[3] == {"role": "user", "content": f"{HEADER}\n- The user's name is Sam.\n\nWhat is my name?"}
    assert with_memories(chat_turns, []) == chat_turns
    embedder.close()
    store.close()


def test_migration_from_v5_keeps_chats(tmp_path):
    db = tmp_path / "chats.db"
    store = ChatStore(db)
    chat = store.new_chat("old")
    store.add_message(chat.id, "user", "hello")
    store.close()
    conn = sqlite3.connect(db)  # back to a v5 database, as an older ripelm left it
    conn.executescript(
        "DROP TABLE memories; DROP TABLE memories_fts; ALTER TABLE chats DROP COLUMN memory; "
        "DROP TRIGGER message_vectors_stale; DROP TABLE message_vectors; "  # and what v7 added
        "PRAGMA user_version = 5;"
    )
    conn.close()
    store = ChatStore(db)
    assert store.chat(chat.id).memory is True and store.memories() == []
    assert store.messages(chat.id)[0].content == "hello"
    store.close()
