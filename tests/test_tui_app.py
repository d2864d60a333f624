"""The chat app driven with Textual's Pilot against the real engine on a tiny model: send and stream,
Esc cancel (latency to the engine's acknowledgement), regenerate, edit and resend, switch chats while a
reply streams, restart with the history intact, context trimming, copy, export, palette, config keys."""

from __future__ import annotations

import asyncio
import time

import pytest
from tui_helpers import ObservedApp, idle, trim_notices, wait_until

from ripelm.chat_export import export_filename
from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import CANCELLED, DONE
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool
from ripelm.tui.chat_list import ChatItem
from ripelm.tui.message_view import MessageView

SIZE = (100, 30)


@pytest.fixture(scope="module")
def long_backend(tiny_model_factory):
    """For tests that act while a reply streams: a reply long enough (several seconds even on a fast
    machine) that it is still streaming when they act. A random-weight model emits an end-of-generation
    token wherever its greedy path happens to meet one, so it is told to ignore it."""
    b = EngineBackend(
        tiny_model_factory(qtype="Q4_0", n_layers=8, context_length=8192),
        device="cpu",
        n_ctx=8192,
        kv_memory=64 << 20,
    )
    b.engine.eog_ids = frozenset()
    yield b
    b.close()


@pytest.fixture
def db_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    return tmp_path / "chats.db"


def make_app(backend, db_path, *, max_tokens=16, **kw) -> ObservedApp:
    store = ChatStore(db_path)
    pool = BackendPool(lambda model, draft: backend, initial=backend)
    return ObservedApp(store, pool, SamplingParams(temperature=0, max_tokens=max_tokens), **kw)


def views(app: RipeApp) -> list[tuple[str, str]]:
    return [(v.role, v.content) for v in app.query(MessageView)]


async def send(pilot, app: RipeApp, text: str) -> None:
    app.query_one("#prompt").value = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.reply is not None or app.query(MessageView)[-1].role == "assistant")


def palette_offers(app: RipeApp, title: str) -> bool:
    found = app.screen.query("CommandList")
    if not found:
        return False
    options = found.first()
    return any(title in str(options.get_option_at_index(i).prompt) for i in range(options.option_count))


def run(coro) -> None:
    asyncio.run(coro)


def test_send_stream_regenerate_switch_and_restart(backend, db_path):
    async def first_session() -> tuple[int, int, list[tuple[str, str]]]:
        app = make_app(backend, db_path)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "What is a cat?")
            seen_streaming: list[int] = []

            def progressed() -> bool:
                if app.reply is not None and app.reply.view is not None and app.reply.view.content:
                    seen_streaming.append(len(app.reply.view.content))
                return idle(app)

            await wait_until(pilot, progressed, what="the first reply")
            chat1 = app.chat.id
            msgs = app.store.messages(chat1)
            assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].state == DONE
            assert msgs[1].content and views(app)[-1] == ("assistant", msgs[1].content)
            assert msgs[1].stats["generated_tokens"] > 0
            assert app.chat.title == "What is a cat?"  # a new chat is named after its first message

            # regenerate: the old reply is replaced; the prompt's K/V come from the prefix cache
            await pilot.press("ctrl+r")
            await wait_until(
                pilot, lambda: idle(app) and len(app.store.messages(chat1)) == 2, what="regenerate"
            )
            again = app.store.messages(chat1)
            assert app.replies_started == 2
            assert again[1].content == msgs[1].content  # greedy: the same prompt gives the same reply
            assert again[1].stats["cached_tokens"] > 0
            assert len(app.query(MessageView)) == 2

            # a second chat, then back to the first through the sidebar
            await pilot.press("ctrl+n")
            await send(pilot, app, "Tell me about dogs")
            await wait_until(pilot, lambda: idle(app), what="the second chat's reply")
            chat2 = app.chat.id
            assert chat2 != chat1 and len(views(app)) == 2
            items = list(app.query(ChatItem))
            assert [i.chat_id for i in items] == [chat2, chat1]
            await pilot.click(items[1])
            await wait_until(pilot, lambda: app.chat.id == chat1, what="switching chats")
            assert views(app) == [("user", "What is a cat?"), ("assistant", again[1].content)]
            return chat1, chat2, views(app)

    async def second_session(chat1: int, chat2: int, shown: list[tuple[str, str]]) -> None:
        app = make_app(backend, db_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.chat.id == chat2  # the chat with the newest message reopens
            items = list(app.query(ChatItem))
            assert [i.chat_id for i in items] == [chat2, chat1]
            await pilot.click(items[1])
            await wait_until(pilot, lambda: app.chat.id == chat1, what="switching chats")
            assert views(app) == shown
            assert app.store.integrity() == "ok"

    chat1, chat2, shown = asyncio.run(first_session())
    asyncio.run(second_session(chat1, chat2, shown))


def test_escape_stops_a_streaming_reply_within_200ms(long_backend, db_path):
    async def go() -> None:
        app = make_app(long_backend, db_path, max_tokens=8000)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "Write a long story")
            await wait_until(
                pilot,
                lambda: app.reply is not None and len(app.reply.recorder.content) > 20,
                what="streaming",
            )
            chat = app.chat.id
            pressed = time.perf_counter()
            await pilot.press("escape")
            await wait_until(pilot, lambda: bool(app.cancel_acks), timeout=5, what="cancel ack")
            latency = app.cancel_acks[0].at - pressed  # key press to the engine's cancel acknowledgement
            print(f"Esc to engine cancel acknowledgement: {latency * 1000:.1f} ms")
            assert latency < 0.2
            await wait_until(pilot, lambda: idle(app), what="the reply to end")
            reply = app.store.messages(chat)[-1]
            assert reply.state == CANCELLED
            assert reply.content and len(reply.content) >= 20  # what was generated is kept
            assert reply.stats["finish_reason"] == "cancelled"
            assert 0 < reply.stats["generated_tokens"] < 8000
            assert app.query(MessageView)[-1].state == CANCELLED
            snap = long_backend.engine.snapshot()
            assert snap.running == 0 and snap.waiting == 0

    run(go())


def test_ui_stays_responsive_and_switching_chats_keeps_the_reply(long_backend, db_path):
    async def go() -> None:
        app = make_app(long_backend, db_path, max_tokens=8000)
        async with app.run_test(size=SIZE) as pilot:
            other = app.store.new_chat("Other chat")
            app.store.add_message(other.id, "user", "an older question")
            await send(pilot, app, "Stream something")
            streaming_chat = app.chat.id
            await wait_until(
                pilot, lambda: app.reply is not None and app.reply.recorder.content, what="tokens"
            )
            # typing while the reply streams goes straight into the prompt
            await pilot.press(*"typing")
            assert app.query_one("#prompt").value == "typing"
            await app.open_chat(other.id)
            assert views(app) == [("user", "an older question")]
            assert app.reply is not None  # still generating, into the store
            await app.open_chat(streaming_chat)
            shown = len(app.reply.view.content)
            await wait_until(
                pilot, lambda: len(app.reply.view.content) > shown, what="streaming on screen again"
            )
            await pilot.press("escape")
            await wait_until(pilot, lambda: idle(app), what="the reply to end")
            final = app.store.messages(streaming_chat)[-1]
            assert final.state == CANCELLED and final.content.startswith(
                app.query(MessageView)[-1].content[:shown]
            )
            assert views(app)[-1] == ("assistant", final.content)

    run(go())


def test_edit_resend_trim_copy_export_and_palette(backend, db_path, tmp_path):
    async def go() -> None:
        app = make_app(backend, db_path, export_dir=tmp_path, keymap={"regenerate": "ctrl+g"})
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "first try")
            await wait_until(pilot, lambda: idle(app))
            chat = app.chat.id
            await pilot.press("f3")  # the last message you sent, into the box
            edit = app.query_one("#prompt")
            assert edit.value == "first try"
            edit.value = "second try"
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.replies_started == 2 and idle(app), what="resend")
            msgs = app.store.messages(chat)
            assert [m.content for m in msgs][0] == "second try" and msgs[1].role == "assistant"
            assert app.replies_started == 2

            await pilot.press("ctrl+g")  # regenerate, bound through the keymap (config.toml [keys])
            await wait_until(pilot, lambda: idle(app) and app.replies_started == 3, what="ctrl+g")
            assert len(app.store.messages(chat)) == 2

            app.action_copy_reply()
            assert app.clipboard == app.store.messages(chat)[-1].content

            # export, run from the command palette
            await pilot.press("ctrl+p")
            await pilot.press(*"export chat")
            await wait_until(
                pilot, lambda: palette_offers(app, "Export chat"), timeout=10, what="the palette"
            )
            await pilot.press("enter")
            exported = tmp_path / export_filename(app.chat)
            await wait_until(pilot, exported.is_file, timeout=10, what="the export")
            text = exported.read_text()
            assert "## You\n\nsecond try" in text and "## Assistant" in text

            # a long history is trimmed to fit the window, oldest first, and the user is told
            for i in range(12):
                app.store.add_message(chat, "user", f"question {i} " + "word " * 40)
                app.store.add_message(chat, "assistant", f"answer {i} " + "word " * 40)
            app.store.update_chat(chat, params={"max_tokens": 400})
            await app.open_chat(chat)
            await send(pilot, app, "and now?")
            await wait_until(pilot, lambda: idle(app), what="the trimmed reply")
            assert trim_notices(app) == 1
            assert "left out" in str(app.query_one("#status").render())
            assert app.store.messages(chat)[-1].state == DONE

    run(go())


def test_rename_search_delete_and_live_status(long_backend, db_path):
    async def go() -> None:
        app = make_app(long_backend, db_path, max_tokens=8000)
        async with app.run_test(size=SIZE) as pilot:
            first = app.chat.id
            await pilot.press("f2")
            await wait_until(pilot, lambda: app.screen.query("#dialog-input"), what="the rename dialog")
            app.screen.query_one("#dialog-input").value = "Kitchen notes"
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.store.chat(first).title == "Kitchen notes", what="rename")
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: app.chat.id != first, what="a new chat")

            # the status bar counts live while a reply streams: tokens/s, context used, KV blocks in use
            await send(pilot, app, "Stream for a while")
            bar = app.query_one("#status")
            await wait_until(
                pilot, lambda: bar.numbers.ctx_used is not None and app.reply is not None, what="live"
            )
            assert (
                bar.numbers.tok_s > 0
                and bar.numbers.kv_used > 0
                and bar.numbers.kv_total >= bar.numbers.kv_used
            )
            assert bar.numbers.ctx_limit == 8192 and "tok/s" in str(bar.render())
            await pilot.press("escape")
            await wait_until(pilot, lambda: idle(app), what="the stop")

            # search by title narrows the sidebar
            await pilot.press("f6")
            await pilot.press(*"kitchen")
            await wait_until(
                pilot, lambda: [i.chat_id for i in app.query(ChatItem)] == [first], what="search"
            )
            app.query_one("#chat-search").value = ""
            await wait_until(pilot, lambda: len(app.query(ChatItem)) == 2, what="the full list")

            # delete the current chat (from the palette's action): its messages go with it
            doomed = app.chat.id
            await app.action_delete_chat()
            assert app.chat.id == first and [c.id for c in app.store.chats()] == [first]
            assert (
                app.store.db.execute("SELECT count(*) FROM messages WHERE chat_id = ?", [doomed]).fetchone()[
                    0
                ]
                == 0
            )

    run(go())
