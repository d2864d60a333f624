"""The hybrid (BM25 + dense) search over all messages: the chat store's vectors (schema v7, real SQLite),
the fusion with the real default embedder, and the chat app driven with Textual's Pilot on the real
engine: messages embedded in the background, a paraphrase sharing no word with a message of an old chat
finds it and Enter opens it; with dense search off or no embedder converted, FTS5 alone, no error."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from retrieval_helpers import make_home
from test_tui_app import SIZE, make_app
from tui_helpers import idle, wait_until

from ripelm.chat_store import ChatStore
from ripelm.chat_store.connection import Database
from ripelm.chat_store.records import PARTIAL
from ripelm.chat_store.upgrades import SCHEMA_VERSION, upgrade
from ripelm.memory_recall import MemoryEmbedder
from ripelm.message_search import DenseMessages, embed_pending, hybrid_hits
from ripelm.models.bundled_embedder import converted_gguf_path
from ripelm.tui.message_view import MessageView
from ripelm.tui.search_screen import MessageSearch

PARAPHRASE = "Japanese shrines with red foliage"  # no word in common with the Kyoto reply


def old_history(store: ChatStore) -> tuple[int, int]:
    """An old chat with the Kyoto reply, and three unrelated chats after it; (chat id, reply id)."""
    old = store.new_chat("Trip ideas")
    store.add_message(old.id, "user", "Where should I go in autumn?")
    target = store.add_message(old.id, "assistant", "Kyoto is lovely then: maples and temples.")
    store.add_message(old.id, "user", "And in spring?")
    for i, text in enumerate(["Boil the eggs for nine minutes.", "The quarterly report is due on Friday.",
                              "Use a context manager to open the file."]):  # fmt: skip
        c = store.new_chat(f"chat {i}")
        store.add_message(c.id, "user", text)
    return old.id, target.id


def test_migration_from_v6_adds_message_vectors(tmp_path):
    db = tmp_path / "chats.db"
    conn = Database(db)
    upgrade(conn, to=6)  # a database as ripelm left it before the message vectors
    conn.execute("INSERT INTO chats (title, created, updated) VALUES ('old', 0, 0)")
    conn.execute(
        "INSERT INTO messages (chat_id, role, content, created) VALUES (1, 'user', 'hello there', 0)"
    )
    conn.execute("UPDATE chats SET leaf_id = 1")
    conn.conn.commit()
    conn.close()
    store = ChatStore(db)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.messages(1)[0].content == "hello there" and store.search("hello")[0].message_id == 1
    assert store.messages_to_embed("fp") == [(1, "hello there")]  # old messages get embedded too
    assert store.message_vectors("fp") == []
    store.close()


def test_vectors_go_with_their_message(tmp_path):
    store = ChatStore(tmp_path / "chats.db")
    chat = store.new_chat("c")
    a = store.add_message(chat.id, "user", "first")
    b = store.add_message(chat.id, "assistant", "second")
    partial = store.start_reply(chat.id)
    store.save_reply(partial.id, "still streaming", state=PARTIAL)
    # newest first, a reply still streaming left out
    assert store.messages_to_embed("fp") == [(b.id, "second"), (a.id, "first")]
    assert store.messages_to_embed("fp", below=b.id) == [(a.id, "first")]  # a pass goes on where it was
    v = np.ones(4, dtype=np.float32).tobytes()
    assert store.set_message_vectors("fp", [(a.id, "first", v), (b.id, "a text it no longer has", v)]) == 1
    assert store.message_vectors("fp") == [(a.id, v)]
    assert store.messages_to_embed("fp") == [(b.id, "second")]
    assert store.messages_to_embed("other") == [(b.id, "second"), (a.id, "first")]  # another embedder
    store.edit_message(a.id, "first, edited")  # the vector described the old text: dropped
    assert store.message_vectors("fp") == [] and (a.id, "first, edited") in store.messages_to_embed("fp")
    store.set_message_vectors("fp", [(a.id, "first, edited", v), (b.id, "second", v)])
    store.edit_message(a.id, "first, edited")  # same text: kept
    assert len(store.message_vectors("fp")) == 2
    store.delete_messages_from(chat.id, b.id)
    assert store.message_vectors("fp") == [(a.id, v)]
    store.delete_chat(chat.id)
    assert (
        store.message_vectors("fp") == []
        and store.db.execute("SELECT count(*) FROM message_vectors").fetchone()[0] == 0
    )
    store.close()


def test_hybrid_search_with_the_real_embedder(tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("RIPELM_HOME", str(home))
    store = ChatStore(home / "chats.db")
    _, target = old_history(store)
    embedders = MemoryEmbedder()
    embedder = embedders.ready()
    assert embedder is not None, embedders.error
    made = embed_pending(lambda fn, *a: fn(*a), store, embedder, embedders.busy, lambda: False, batch=2)
    assert made == 6 and store.messages_to_embed(embedder.info.fingerprint) == []
    dense = DenseMessages(store, embedder)
    assert len(dense) == 6

    def search(text):
        return hybrid_hits(store, text, dense.cosines(embedder.embed_query(text)))

    assert store.search(PARAPHRASE) == []  # FTS5 alone finds nothing
    hits = search(PARAPHRASE)
    assert hits and hits[0].message_id == target and hits[0].chat_title == "Trip ideas"
    assert hits[0].snippet == "Kyoto is lovely then: maples and temples."
    assert all(h.message_id != target for h in search("spreadsheet totals"))  # unrelated: not listed
    # a word match still comes first, with its highlighted snippet
    (first, *_) = search("eggs")
    assert "\x02eggs\x03" in first.snippet.lower() or "\x02Eggs\x03" in first.snippet
    assert hybrid_hits(store, "maple", {})[0].message_id == target  # no dense side: FTS5 as it was
    embedders.close()
    store.close()


def run(coro) -> None:
    asyncio.run(coro)


def test_paraphrase_finds_an_old_chats_message_and_enter_opens_it(backend, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go() -> None:
        app = make_app(backend, home / "chats.db")
        old, target = old_history(app.store)
        async with app.run_test(size=SIZE) as pilot:
            assert app.chat.id != old
            # searched at once: no message has a vector yet; opening the search starts the background
            # pass, and the results become hybrid when it has embedded the messages
            await pilot.press("ctrl+f", *PARAPHRASE)
            screen = app.screen
            assert isinstance(screen, MessageSearch)
            await wait_until(pilot, lambda: screen.dense_queries > 0 and screen.hits, what="hybrid results")
            assert screen.hits[0].message_id == target
            await wait_until(pilot, lambda: app.message_vectors_made == 6, what="the pass to end")
            fp = app.memory_embedder.get().info.fingerprint
            assert app.store.messages_to_embed(fp) == []
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.chat.id == old, what="the old chat to open")
            await wait_until(pilot, lambda: isinstance(app.focused, MessageView), what="the message selected")
            assert app.focused.message_id == target
            # a new message and its reply are embedded after the reply ends
            app.query_one("#prompt").focus()
            app.query_one("#prompt").value = "I keep a sourdough starter on the counter."
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.replies_started == 1 and idle(app), what="the reply")
            await wait_until(pilot, lambda: app.message_vectors_made >= 8, what="the new messages embedded")
            assert app.store.messages_to_embed(fp) == []

    run(go())


@pytest.mark.parametrize("converted", [False, True])
def test_fts_only_without_an_embedder_or_with_dense_search_off(backend, tmp_path, monkeypatch, converted):
    home = make_home(tmp_path / "home") if converted else tmp_path / "home"
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go() -> None:
        app = make_app(backend, tmp_path / "chats.db", dense_search=not converted)
        old, target = old_history(app.store)
        async with app.run_test(size=SIZE) as pilot:
            app.index_messages()  # a pass now: it finds nothing to embed with
            await pilot.press("ctrl+f", *PARAPHRASE)
            screen = app.screen
            await pilot.pause(0.5)
            assert screen.hits == [] and screen.dense_queries == 0
            await pilot.press(*["backspace"] * len(PARAPHRASE), *"maple")
            await wait_until(pilot, lambda: len(screen.hits) == 1, what="the word found")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.chat.id == old, what="the old chat to open")
            await wait_until(pilot, lambda: isinstance(app.focused, MessageView), what="the message selected")
            assert app.focused.message_id == target
            assert app.message_vectors_made == 0 and app.store.message_vectors("x") == []
            assert app.store.db.execute("SELECT count(*) FROM message_vectors").fetchone()[0] == 0
        assert (converted_gguf_path() is not None) == converted  # search never converted the embedder

    run(go())


def test_config_dense_search_switch(tmp_path):
    from ripelm.config import ConfigError, load_config

    path = tmp_path / "config.toml"
    assert load_config(tmp_path / "none.toml").dense_search is True
    path.write_text("[chat]\ndense_search = false\n")
    assert load_config(path).dense_search is False
    path.write_text('[chat]\ndense_search = "no"\n')
    with pytest.raises(ConfigError, match="dense_search"):
        load_config(path)
