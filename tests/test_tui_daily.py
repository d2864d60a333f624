"""The chat app for daily use, driven with Textual's Pilot on the real engine with a tiny model: multi-line
messages (Enter sends, Ctrl+J a new line, or the reverse by config; a paste kept intact)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from test_tui_app import SIZE, make_app, views
from textual import events
from textual.widgets import Collapsible, Static
from textual.widgets._collapsible import CollapsibleTitle
from tui_helpers import idle, wait_until

from ripelm.chat_store import ChatStore
from ripelm.config import load_config
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool
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


def test_theme_is_saved_to_config_and_used_at_the_next_start(backend, db_path, tmp_path):
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text('model = "smollm2:135m"  # my model\n\n[keys]\nregenerate = "ctrl+g"\n')

    async def pick() -> None:
        app = make_app(backend, db_path, config_path=cfg_path, theme=load_config(cfg_path).theme)
        async with app.run_test(size=SIZE) as pilot:
            app.theme = "nord"  # what the palette's theme picker sets
            await pilot.pause()

    async def restart() -> None:
        cfg = load_config(cfg_path)
        app = make_app(backend, db_path, config_path=cfg_path, theme=cfg.theme)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.theme == "nord"

    run(pick())
    text = cfg_path.read_text()
    assert "# my model" in text and 'regenerate = "ctrl+g"' in text  # the user's file is kept as written
    assert load_config(cfg_path).theme == "nord"
    run(restart())


def test_thinking_is_a_collapsed_block_apart_from_the_answer(backend, db_path):
    async def go() -> None:
        app = make_app(backend, db_path)
        chat = app.store.new_chat("reasoning")
        app.store.add_message(chat.id, "user", "2+2?")
        reply = "<think>\nTwo plus two: count up.\n</think>\n\nIt is **4**."
        app.store.add_message(chat.id, "assistant", reply)
        async with app.run_test(size=SIZE) as pilot:
            await app.open_chat(chat.id)
            await pilot.pause()
            view = app.query(MessageView)[-1]
            block = view.query_one(Collapsible)
            assert block.collapsed and block.title == "thinking"
            assert view.answer == "It is **4**." and "count up" not in view.query_one(".answer").source
            assert "Two plus two" in str(view.query_one(".thinking-text", Static).content)

            # while a reply streams: the tag split over deltas, the reasoning into the block, then the answer
            live = MessageView("assistant", "", state="streaming")
            await app.query_one("#conversation").mount(live)
            await live.append("<thi")
            assert not live.query(Collapsible) and live.answer == ""
            await live.append("nk>step one")
            assert live.query_one(Collapsible).collapsed and live.answer == ""
            await live.append(" step two</think>The ans")
            await live.append("wer")
            await live.end_stream()
            await pilot.pause()
            assert str(live.query_one(".thinking-text", Static).content) == "step one step two"
            assert live.answer == "The answer" and live.query_one(".answer").source == "The answer"
            await pilot.click(live.query_one(CollapsibleTitle))
            assert not live.query_one(Collapsible).collapsed  # expands on a click (or Enter)

    run(go())


THREE_BLOCKS = """Three ways:

```python
print("one")
```

Or in the shell:

```bash
echo two
```

And finally:

```
three
```
"""


def test_copy_the_second_of_three_code_blocks_and_any_message(backend, db_path):
    async def go() -> None:
        app = make_app(backend, db_path)
        chat = app.store.new_chat("code")
        app.store.add_message(chat.id, "user", "Show me three ways")
        app.store.add_message(chat.id, "assistant", THREE_BLOCKS)
        app.store.add_message(chat.id, "user", "thanks")
        app.store.add_message(chat.id, "assistant", "You're welcome.")
        async with app.run_test(size=SIZE) as pilot:
            await app.open_chat(chat.id)
            await pilot.press("ctrl+up")  # select the last message, then up twice: the three-block reply
            await pilot.press("up", "up")
            assert app.focused is app.query(MessageView)[1]
            await pilot.press("2")
            assert app.clipboard == 'echo two\n'
            await pilot.press("up", "c")  # the first message, whole
            assert app.clipboard == "Show me three ways"
            await pilot.press("down", "down", "down", "down")  # past the last message: the box again
            assert app.focused is app.query_one("#prompt")
            await pilot.press(*"hi")
            assert app.query_one("#prompt").value == "hi"

    run(go())


def test_search_finds_a_word_from_an_old_chat_and_opens_it(backend, db_path):
    async def go() -> None:
        app = make_app(backend, db_path)
        old = app.store.new_chat("Trip ideas")
        app.store.add_message(old.id, "user", "Where should I go in autumn?")
        target = app.store.add_message(old.id, "assistant", "Kyoto is lovely then: maples and temples.")
        app.store.add_message(old.id, "user", "And in spring?")
        for i in range(3):
            c = app.store.new_chat(f"chat {i}")
            app.store.add_message(c.id, "user", f"unrelated question {i}")
        async with app.run_test(size=SIZE) as pilot:
            assert app.chat.id != old.id
            await pilot.press("ctrl+f", *"maple")
            await wait_until(pilot, lambda: app.screen.query("#search-results").first().option_count == 1)
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.chat.id == old.id, what="the old chat to open")
            await wait_until(pilot, lambda: isinstance(app.focused, MessageView), what="the message selected")
            assert app.focused.message_id == target.id and "maples" in app.focused.content
            await pilot.press("c")
            assert app.clipboard == target.content

    run(go())


def labels(app) -> list[str]:
    return [str(v.query_one(".role").content) for v in app.query(MessageView)]


def test_branches_edit_a_middle_message_switch_restart_and_regenerate_from_the_cache(backend, db_path):
    async def first() -> tuple[int, list[tuple[str, str]]]:
        app = make_app(backend, db_path)
        async with app.run_test(size=SIZE) as pilot:
            for text in ("one", "two", "three"):
                await pilot.press(*text, "enter")
                await wait_until(pilot, lambda: idle(app) and app.query(MessageView)[-1].role == "assistant")
            original = views(app)
            assert [r for r, _ in original] == ["user", "assistant"] * 3
            await pilot.press("ctrl+up", "up", "up", "up")  # the middle message you sent
            assert app.focused.content == "two"
            await pilot.press("e")
            box = app.query_one("#prompt")
            assert box.value == "two" and app.focused is box
            await pilot.press("end", *" (edited)", "enter")
            await wait_until(pilot, lambda: app.replies_started == 4 and idle(app), what="the edited branch")
            assert [c for _, c in views(app)][:3] == ["one", original[1][1], "two (edited)"]
            assert len(views(app)) == 4 and labels(app)[2] == "You  ‹ 2/2 ›"
            return app.chat.id, original

    async def second(chat: int, original: list[tuple[str, str]]) -> None:
        app = make_app(backend, db_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.chat.id == chat and [c for _, c in views(app)][2] == "two (edited)"  # survived
            edited = views(app)
            await pilot.press("ctrl+up", "up")  # the edited message
            await pilot.press("less_than_sign")
            await wait_until(pilot, lambda: len(views(app)) == 6, what="the first branch")
            assert views(app) == original and labels(app)[2] == "You  ‹ 1/2 ›"
            assert app.focused.content == "two"  # the version switched to stays selected
            await pilot.press("greater_than_sign")
            await wait_until(pilot, lambda: len(views(app)) == 4, what="the edited branch again")
            assert views(app) == edited

            # regenerate the reply on this branch: its prompt's full K/V blocks come from the prefix cache
            engine = backend.engine
            before = engine.counters.prefill_tokens
            await pilot.press("down", "r")
            await wait_until(pilot, lambda: app.replies_started == 1 and idle(app), what="regenerate")
            computed = engine.counters.prefill_tokens - before
            reply = app.store.messages(chat)[-1]
            prompt, cached = reply.stats["prompt_tokens"], reply.stats["cached_tokens"]
            print(f"regenerate on a branch: {prompt} prompt tokens, {cached} cached, {computed} computed")
            assert computed == prompt - cached and 0 < computed <= engine.counters.block_size
            assert cached >= prompt - engine.counters.block_size
            assert labels(app)[3].endswith("‹ 3/3 ›") or labels(app)[3].endswith("‹ 2/2 ›")

    chat, original = asyncio.run(first())
    asyncio.run(second(chat, original))


def test_the_box_takes_input_while_the_model_loads_in_the_background(tiny_model_factory, db_path):
    """The app starts with no model open and loads it on a worker thread; typing and sending work at once
    (the load is held back here until the message is typed, so the order is certain)."""
    path = tiny_model_factory(qtype="Q4_0", n_layers=2)
    typed = threading.Event()
    opened: list[EngineBackend] = []

    def opener(model, draft):
        assert typed.wait(60)
        opened.append(EngineBackend(path, device="cpu", n_ctx=1024, kv_memory=32 << 20))
        return opened[-1]

    async def go() -> None:
        app = RipeApp(ChatStore(db_path), BackendPool(opener), SamplingParams(temperature=0, max_tokens=8))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*"early bird", "enter")
            assert app.pool.current() is None and "loading" in str(app.query_one("#status").render())
            assert app.store.messages(app.chat.id)[0].content == "early bird"  # stored before the model
            typed.set()
            await wait_until(pilot, lambda: idle(app) and app.replies_started == 1, what="the reply")
            assert app.store.messages(app.chat.id)[-1].state == "done" and len(opened) == 1
            assert "loading" not in str(app.query_one("#status").render())

    try:
        run(go())
    finally:
        for b in opened:
            b.close()
