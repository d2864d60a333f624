"""Document Q&A in the chat app: attach an indexed collection from the palette, ask, get the reply with
its numbered sources stored and listed; selecting a source shows the passage with its file and lines.
Real embedder (the bundled MiniLM GGUF), real engine on a tiny model."""

from __future__ import annotations

import asyncio

from retrieval_helpers import make_home, ripe
from tui_helpers import idle, wait_until

from ripelm.chat_docs import SOURCES
from ripelm.chat_store import ChatStore
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool
from ripelm.tui.dialogs import Passage, Picker

DOC = "".join(f"Line {i} of the notes.\n" for i in range(1, 6)) + (
    "The paged KV cache stores keys and values in fixed-size blocks.\n"
    "A block table maps each sequence to its blocks.\n"
)


def test_attach_collection_answer_cites_sources(backend, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "kv.md").write_text(DOC)
    p = ripe("index", str(tmp_path / "docs"), "--collection", "notes", home=home)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("RIPELM_HOME", str(home))
    models = [("smollm2:135m", "smollm2:135m (bundled)"), ("tiny:test", "tiny:test (file)")]

    async def go() -> None:
        store = ChatStore(home / "chats.db")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=12), model_choices=models)
        async with app.run_test(size=(100, 30)) as pilot:
            # model picker: the chat remembers its model
            await pilot.press("ctrl+o")
            await wait_until(pilot, lambda: isinstance(app.screen, Picker), what="the model picker")
            await pilot.press("down", "enter")
            await wait_until(pilot, lambda: app.chat.model == "tiny:test", what="the model choice")

            app.action_attach_collection()
            await wait_until(pilot, lambda: isinstance(app.screen, Picker), what="the collection picker")
            await pilot.press("down", "enter")  # (no collection), then "notes"
            await wait_until(pilot, lambda: app.chat.collection == "notes", what="attaching")

            app.query_one("#prompt").value = "How does the paged KV cache store keys?"
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.replies_started == 1 and idle(app), what="the answer")
            reply = app.store.messages(app.chat.id)[-1]
            assert reply.sources and reply.sources[0]["path"].endswith("kv.md")
            assert reply.sources[0]["where"].startswith(str(tmp_path / "docs" / "kv.md"))
            sources = app.query(".sources").first()
            assert sources.option_count == len(reply.sources)
            sources.focus()
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, Passage), what="the passage")
            shown = app.screen.source
            assert shown["number"] == 1 and "paged KV cache" in shown["text"]
            await pilot.press("escape")

    asyncio.run(go())


def test_index_a_folder_from_the_app(backend, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    docs = tmp_path / "manual"
    docs.mkdir()
    (docs / "kv.md").write_text(DOC)
    (docs / "other.txt").write_text("Speculative decoding drafts tokens with a small model.\n")
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go() -> None:
        store = ChatStore(home / "chats.db")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=8))
        async with app.run_test(size=(100, 30)) as pilot:
            app.action_index_folder()
            await wait_until(pilot, lambda: app.screen.query("#dialog-input"), what="the folder prompt")
            app.screen.query_one("#dialog-input").value = str(docs)
            await pilot.press("enter")
            await wait_until(
                pilot,
                lambda: (
                    app.screen.query("#dialog-input")
                    and app.screen.query_one("#dialog-input").value == "manual"
                ),
                what="the collection name prompt",
            )
            await pilot.press("enter")
            await wait_until(
                pilot, lambda: app.index_reports or list(app._notifications), timeout=120, what="indexing"
            )
            assert app.index_reports, [n.message for n in app._notifications]
            report = app.index_reports[0]
            assert report.indexed == 2 and report.chunks_total >= 2
            assert app.chat.collection == "manual"
            assert "manual: 2 files indexed" in str(app.query_one("#status").render())

    asyncio.run(go())


def test_retrieved_passages_trimmed_to_the_context_with_a_notice(backend, tmp_path, monkeypatch):
    """Passages that do not all fit the window (1k tokens here, half kept for the reply) are cut from the
    least relevant; the answer is made from those that fit and the user is told how many were left out."""
    home = make_home(tmp_path / "home")
    (tmp_path / "docs").mkdir()
    for i in range(6):
        body = f"Section {i} about the paged KV cache and its blocks. " * 14
        (tmp_path / "docs" / f"part{i}.md").write_text(body + "\n")
    p = ripe("index", str(tmp_path / "docs"), "--collection", "big", home=home)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go() -> None:
        store = ChatStore(home / "chats.db")
        chat = store.new_chat("docs", collection="big")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=512))
        async with app.run_test(size=(100, 30)) as pilot:
            await app.open_chat(chat.id)
            app.query_one("#prompt").value = "How does the paged KV cache use blocks?"
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.replies_started == 1 and idle(app), what="the answer")
            reply = app.store.messages(chat.id)[-1]
            assert reply.state == "done" and app.passage_notices == 1
            assert 1 <= len(reply.sources) < SOURCES
            assert "retrieved passages left out" in str(app.query_one("#status").render())

    asyncio.run(go())
