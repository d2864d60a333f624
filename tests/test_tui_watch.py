"""The chat app's "Watch documents" toggle: with it on, files added, changed or deleted in the folder of
the chat's collection are re-indexed within 2 s (real SQLite store, real files, the bundled embedder);
toggled off, changes are left alone."""

from __future__ import annotations

import asyncio
import time

from retrieval_helpers import make_home, ripe
from tui_helpers import wait_until

from ripelm.chat_store import ChatStore
from ripelm.retrieval_cli import store_path
from ripelm.runtime.retrieval.store import Store
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool


def _docs(name: str) -> dict[str, str]:
    with Store(store_path()) as st:
        c = st.get_collection(name)
        return {p: r.content_hash for p, r in st.documents(c).items()}


def test_watch_toggle_reindexes_changed_files(backend, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    docs = tmp_path / "notes"
    (docs / "sub").mkdir(parents=True)
    (docs / "kv.md").write_text("The paged KV cache keeps keys in blocks.\n")
    (docs / "sub" / "old.txt").write_text("Speculative decoding drafts tokens.\n")
    p = ripe("index", str(docs), "--collection", "notes", home=home)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go():
        store = ChatStore(home / "chats.db")
        chat = store.new_chat("docs", collection="notes")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=8))
        async with app.run_test(size=(100, 30)) as pilot:
            await app.open_chat(chat.id)
            titles = [c.title for c in app.get_system_commands(app.screen)]
            assert "Watch documents" in titles
            before = _docs("notes")
            assert len(before) == 2

            app.action_toggle_watch()
            assert app.watched == "notes"
            await wait_until(pilot, lambda: app.watch_runs >= 1, timeout=60, what="the first pass")
            await asyncio.sleep(0.3)  # the observer is live before the first pass: nothing is missed

            t0 = time.monotonic()
            (docs / "new.md").write_text("Flash attention tiles the softmax.\n")
            (docs / "kv.md").write_text("The paged KV cache keeps values in fixed-size blocks too.\n")
            (docs / "sub" / "old.txt").unlink()
            new, kv, old = (str(docs / "new.md"), str(docs / "kv.md"), str(docs / "sub" / "old.txt"))

            def updated() -> bool:
                now = _docs("notes")
                return new in now and old not in now and now.get(kv) != before[kv]

            await wait_until(pilot, updated, timeout=10, what="re-indexing")
            assert time.monotonic() - t0 <= 2.0, time.monotonic() - t0
            assert "notes: " in str(app.query_one("#status").render())

            app.action_toggle_watch()  # off: a later change stays out
            assert app.watched is None
            await asyncio.sleep(0.5)
            (docs / "later.md").write_text("Written after the watch stopped.\n")
            await asyncio.sleep(1.5)
            assert str(docs / "later.md") not in _docs("notes")

            runs = app.watch_runs
            app.action_toggle_watch()  # on again (picks up later.md), then left on when the app quits
            await wait_until(pilot, lambda: app.watch_runs > runs, timeout=10, what="the pass")
            assert str(docs / "later.md") in _docs("notes")
            runs = app.watch_runs
        return app, runs

    app, runs = asyncio.run(go())
    assert app._watch_stop.is_set()  # quitting ended the watch: no more runs after it
    (docs / "after.md").write_text("Written after the app quit.\n")
    time.sleep(1.5)
    assert str(docs / "after.md") not in _docs("notes") and app.watch_runs == runs


def test_watch_toggle_needs_a_collection(backend, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go() -> None:
        store = ChatStore(home / "chats.db")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=8))
        async with app.run_test(size=(100, 30)) as pilot:
            app.action_toggle_watch()
            assert app.watched is None
            await wait_until(
                pilot,
                lambda: any("attach a collection" in n.message for n in app._notifications),
                what="the notice",
            )

    asyncio.run(go())
