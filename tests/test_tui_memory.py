"""Memory in the chat app (Textual pilot, the real engine on a tiny model, the real embedder): a fact the
user states in one chat is saved with its message and is in the prompt of a new chat; editing and
deleting in the memory panel take effect on the next prompt; Enter on a memory opens the message it was
said in; `/memory off` keeps a chat out of it."""

from __future__ import annotations

import asyncio

from retrieval_helpers import make_home
from tui_helpers import idle, wait_until

from ripelm.chat_store import ChatStore
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool
from ripelm.tui.dialogs import TextPrompt
from ripelm.tui.memory_panel import MemoryPanel
from ripelm.tui.message_view import MessageView

NAME = "The user's name is Sam."


async def send(app, pilot, text: str) -> None:
    started = app.replies_started
    app.query_one("#prompt").value = text
    await pilot.press("enter")
    if text.startswith("/"):
        await pilot.pause()
        return
    await wait_until(pilot, lambda: app.replies_started == started + 1 and idle(app), what="the reply")


def recalled(app) -> str:
    """The message the last reply answered, as sent with the memories recalled into it ("" if none)."""
    turns = app.recalled_turns or []
    return turns[-1]["content"] if turns and turns[-1]["role"] == "user" else ""


def test_memory_across_chats_panel_and_provenance(backend, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go() -> None:
        store = ChatStore(home / "chats.db")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=6))
        async with app.run_test(size=(110, 34)) as pilot:
            first = app.chat.id
            await send(app, pilot, "Hello there. Call me Sam.")
            (said,) = [m for m in store.messages(first) if m.role == "user"]
            (mem,) = store.memories()
            assert (mem.content, mem.chat_id, mem.message_id) == (NAME, first, said.id)
            assert any(f"remembered #{mem.id}" in n for n in app.memory_notices)
            for i in range(12):  # a longer chat, so that the source message is out of view when it opens
                store.add_message(first, "user" if i % 2 == 0 else "assistant", f"line {i}\n" * 3)

            # a new chat: the fact is in the prompt of its first reply, and the reply records it
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: app.chat.id != first, what="the new chat")
            second = app.chat.id
            app.recalled_turns = None
            await send(app, pilot, "What is my name?")
            assert NAME in recalled(app)
            assert store.messages(second)[-1].stats["memories"] == [mem.id]

            # /remember, then the panel: edit one, delete the other
            await send(app, pilot, "/remember My favourite editor is Helix")
            assert [m.content for m in store.memories()] == [NAME, "My favourite editor is Helix"]
            await send(app, pilot, "/memories")
            await wait_until(pilot, lambda: isinstance(app.screen, MemoryPanel), what="the memory panel")
            await pilot.press("e")
            await wait_until(pilot, lambda: isinstance(app.screen, TextPrompt), what="the edit box")
            app.screen.query_one("#dialog-input").value = "The user's name is Samantha."
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, MemoryPanel), what="the panel again")
            assert store.memory(mem.id).content == "The user's name is Samantha."
            await pilot.press("down", "d")
            await wait_until(pilot, lambda: len(store.memories()) == 1, what="the delete")
            await pilot.press("escape")
            app.recalled_turns = None
            await send(app, pilot, "Tell me my name again")
            assert "Samantha" in recalled(app) and "Helix" not in recalled(app)

            # provenance: Enter on the memory opens the first chat at the message it was said in
            await pilot.press("f7")
            await wait_until(pilot, lambda: isinstance(app.screen, MemoryPanel), what="the memory panel")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.chat.id == first, what="the source chat")
            await wait_until(
                pilot,
                lambda: isinstance(app.focused, MessageView) and app.focused.message_id == said.id,
                what="the source message selected",
            )
            conv = app.query_one("#conversation")
            assert conv.max_scroll_y > 0  # the chat is longer than the screen: the message is scrolled to
            await wait_until(pilot, lambda: conv.region.overlaps(app.focused.region), what="it in view")
            await pilot.pause(0.3)
            assert conv.region.overlaps(app.focused.region)  # and stays there

            # memory off for a chat: nothing recalled, nothing saved; deleting it keeps the memory
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: app.chat.id not in (first, second), what="a third chat")
            await send(app, pilot, "/memory off")
            assert store.chat(app.chat.id).memory is False
            app.recalled_turns = None
            await send(app, pilot, "What is my name? I'm vegetarian.")
            assert app.recalled_turns is None and len(store.memories()) == 1
            assert store.messages(app.chat.id)[-1].stats.get("memories") is None

    asyncio.run(go())


def test_memory_off_in_config(backend, tmp_path, monkeypatch):
    from ripelm.config import MemoryConfig

    home = make_home(tmp_path / "home")
    monkeypatch.setenv("RIPELM_HOME", str(home))

    async def go() -> None:
        store = ChatStore(home / "chats.db")
        store.add_memory("The user's name is Sam.")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        off = MemoryConfig(enabled=False)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=4), memory=off)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(app, pilot, "Call me Alex. What is my name?")
            assert app.recalled_turns is None and len(store.memories()) == 1
            await send(app, pilot, "/remember x")
            assert "off in config.toml" in app.memory_notices[-1]

    asyncio.run(go())
