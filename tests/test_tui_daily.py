"""The chat app for daily use, driven with Textual's Pilot on the real engine with a tiny model: multi-line
messages (Enter sends, Ctrl+J a new line, or the reverse by config; a paste kept intact)."""

from __future__ import annotations

import asyncio

import pytest
from test_tui_app import SIZE, make_app
from textual import events
from tui_helpers import idle, wait_until

from ripelm.config import load_config
from ripelm.tui.message_view import MessageView


@pytest.fixture
def db_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    return tmp_path / "chats.db"


def run(coro) -> None:
    asyncio.run(coro)


def test_multi_line_message_sent_intact_and_paste(backend, db_path):
    async def go() -> None:
        app = make_app(backend, db_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*"line one", "ctrl+j", *"line two", "shift+enter", *"three")
            box = app.query_one("#prompt")
            assert box.value == "line one\nline two\nthree" and app.reply is None  # nothing sent yet
            await pilot.press("enter")
            await wait_until(pilot, lambda: idle(app), what="the reply")
            msgs = app.store.messages(app.chat.id)
            assert msgs[0].content == "line one\nline two\nthree" and box.value == ""
            assert app.query(MessageView)[0].content == "line one\nline two\nthree"

            # a long paste with code goes in as it is (newlines do not send)
            code = "def f(x):\n    return x * 2\n\n" + "print(f(21))\n" * 200
            app.post_message(events.Paste(code))  # as a terminal's bracketed paste arrives
            await wait_until(pilot, lambda: box.value == code, what="the paste")
            assert app.replies_started == 1
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.replies_started == 2 and idle(app), what="the second reply")
            assert app.store.messages(app.chat.id)[2].content == code.strip()

    run(go())


def test_enter_makes_a_new_line_when_configured(backend, db_path, tmp_path):
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text("[chat]\nenter_sends = false\n")
    cfg = load_config(cfg_path)
    assert cfg.enter_sends is False

    async def go() -> None:
        app = make_app(backend, db_path, enter_sends=cfg.enter_sends)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*"first", "enter", *"second")
            assert app.query_one("#prompt").value == "first\nsecond" and app.replies_started == 0
            await pilot.press("ctrl+j")
            await wait_until(pilot, lambda: app.replies_started == 1 and idle(app), what="the reply")
            assert app.store.messages(app.chat.id)[0].content == "first\nsecond"

    run(go())
