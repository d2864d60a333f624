"""Snapshot tests (pytest-textual-snapshot) of the chat app's main screens at 80x24: a conversation with a
code block, the command palette, the model picker, the search over all messages, a reply with a collapsed
thinking block under a message with two versions, and a selected message. The app runs on the real
engine with a tiny model; the conversation is stored beforehand so the pictures do not depend on sampling
or timing.
Update the pictures with `pytest tests/test_tui_snapshots.py --snapshot-update` after a deliberate change."""

from __future__ import annotations

import pytest

from ripelm.chat_store import ChatStore
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool

REPLY = """Use `sum` over the list:

```python
def total(xs: list[int]) -> int:
    return sum(xs)
```

It returns **0** for an empty list."""

async def steady_cursor(pilot) -> None:
    """The message box's cursor does not blink here, so a picture never depends on the blink's phase."""
    pilot.app.query_one("#prompt").cursor_blink = False


MODELS = [
    ("smollm2:135m", "smollm2:135m  (bundled, 92 MB)"),
    ("qwen2.5:0.5b", "qwen2.5:0.5b  (pull, 398 MB)"),
]


@pytest.fixture
def app(backend, tmp_path, monkeypatch) -> RipeApp:
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    store = ChatStore(tmp_path / "chats.db")
    store.new_chat("Pasta for four")
    chat = store.new_chat("Sum a list in Python")
    store.add_message(chat.id, "user", "How do I add up a list of numbers in Python?")
    store.add_message(chat.id, "assistant", REPLY)
    pool = BackendPool(lambda model, draft: backend, initial=backend)
    return RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=16), model_choices=MODELS)


def test_main_screen(snap_compare, app):
    assert snap_compare(app, terminal_size=(80, 24), run_before=steady_cursor)


def test_command_palette(snap_compare, app):
    assert snap_compare(app, terminal_size=(80, 24), run_before=steady_cursor, press=["ctrl+p", *"regen"])


def test_model_picker(snap_compare, app):
    assert snap_compare(app, terminal_size=(80, 24), run_before=steady_cursor, press=["ctrl+o"])


@pytest.fixture
def branched_app(backend, tmp_path, monkeypatch) -> RipeApp:
    """A chat whose question was edited once (two versions) and answered with reasoning."""
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    store = ChatStore(tmp_path / "chats.db")
    chat = store.new_chat("Boiling eggs")
    first = store.add_message(chat.id, "user", "How long for an egg?")
    store.add_message(chat.id, "assistant", "About nine minutes.")
    store.add_message(
        chat.id, "user", "How long for a soft-boiled egg?\nI like the yolk runny.", replace_from=first.id
    )
    store.add_message(
        chat.id, "assistant", "<think>Soft-boiled: the white sets, the yolk stays runny.</think>Six minutes."
    )
    pool = BackendPool(lambda model, draft: backend, initial=backend)
    return RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=16))


def test_message_search(snap_compare, app):
    assert snap_compare(app, terminal_size=(80, 24), run_before=steady_cursor, press=["ctrl+f", *"numbers"])


def test_thinking_block_and_versions(snap_compare, branched_app):
    assert snap_compare(branched_app, terminal_size=(80, 24), run_before=steady_cursor)


def test_selected_message(snap_compare, branched_app):
    press = ["ctrl+up", "up"]
    assert snap_compare(branched_app, terminal_size=(80, 24), run_before=steady_cursor, press=press)
