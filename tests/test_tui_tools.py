"""Tools in the chat app, driven with Textual's Pilot against the real engine on a tiny model. A random-
weight model cannot choose a tool, so the calls are forced by the tool-call parser's grammar (constrained
sampling); the arguments are pinned with `const` in the schema the grammar follows, while the tool that
runs is the real one with its real schema. Covered: a file read runs and its result shows (collapsed); a
shell command runs only after the user confirms that exact command and not after a refusal; the loop is
cut at the cap; Esc stops a loop; an MCP server (tests/mcp_test_server.py, stdio, the `mcp` SDK) is listed
and called; `/tools on|off` is kept with the chat."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
from pathlib import Path

import pytest
from retrieval_helpers import make_home, ripe
from tui_helpers import idle, wait_until

from ripelm.assistant_tools.settings import ChatTools, McpServerConfig, ToolSettings
from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import CANCELLED, DONE
from ripelm.chat_turns import history
from ripelm.runtime.sampling import SamplingParams
from ripelm.tool_loop import Forced
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool
from ripelm.tui.tool_views import ConfirmCommand, ToolCallView

SIZE = (100, 30)
MCP_SERVER = Path(__file__).resolve().parent / "mcp_test_server.py"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "notes.txt").write_text("buy oat milk\n")
    return tmp_path


def make_app(backend, home: Path, settings: ToolSettings, force: Forced | None) -> RipeApp:
    store = ChatStore(home / "chats.db")
    pool = BackendPool(lambda model, draft: backend, initial=backend)
    tools = ChatTools.from_settings(settings, log_path=home / "mcp.log")
    app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=96), chat_tools=tools)
    app.tool_force = force
    return app


def pinned(name: str, **args: str) -> Forced:
    """Force a call of `name` whose arguments are exactly `args`."""
    props = {k: {"type": "string", "const": v} for k, v in args.items()}
    schema = {"type": "object", "properties": props, "required": list(args), "additionalProperties": False}
    tool = {"type": "function", "function": {"name": name, "description": "", "parameters": schema}}
    return Forced({"type": "function", "function": {"name": name}}, rounds=1, tools=[tool])


async def send(pilot, app: RipeApp, text: str) -> None:
    app.query_one("#prompt").value = text
    await pilot.press("enter")
    await pilot.pause()


def calls(app: RipeApp) -> list[ToolCallView]:
    return list(app.query(ToolCallView))


def run(coro) -> None:
    asyncio.run(coro)


def test_file_read_call_runs_and_its_result_shows(backend, home):
    settings = ToolSettings(on=["read_file"], folders=[str(home / "allowed")])
    app = make_app(backend, home, settings, pinned("read_file", path="notes.txt"))

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "What is on my shopping list?")
            await wait_until(pilot, lambda: calls(app) and calls(app)[0].result is not None, what="the call")
            await wait_until(pilot, lambda: idle(app), what="the reply")
            view = calls(app)[0]
            assert view.label == 'read_file(path="notes.txt")'
            assert view.result_text == "buy oat milk\n" and view.result.ok
            assert view.collapsed  # shown collapsed: the title says what ran, the result opens on demand
            assert app.tool_loops[-1].calls_made == 1
            last = app.store.messages(app.chat.id)[-1]
            assert last.role == "assistant" and last.state == DONE
            # kept with the reply: shown again when the chat is opened, and in the next prompt
            assert [c["content"] for c in last.stats["tool_calls"]] == ["buy oat milk\n"]
            await app.open_chat(app.chat.id)
            assert [(v.label, v.result_text) for v in calls(app)] == [(view.label, "buy oat milk\n")]
            turns = history(app.chat, app.store.messages(app.chat.id), with_tools=True)
            assert [t["role"] for t in turns] == ["user", "assistant", "tool", "assistant"]
            assert turns[1]["tool_calls"][0]["function"]["name"] == "read_file"
            assert turns[2]["content"] == "buy oat milk\n"

    run(go())
    app.chat_tools.close()


def test_shell_runs_only_after_confirmation(backend, home):
    command = "echo confirmed >> ran.txt"
    settings = ToolSettings(on=["run_shell"], folders=[str(home / "allowed")])
    app = make_app(backend, home, settings, pinned("run_shell", command=command))
    marker = home / "allowed" / "ran.txt"

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "Note that I confirmed.")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmCommand), what="the dialog")
            assert app.screen.command == command  # the exact command, as it would run
            assert not marker.exists()  # nothing ran while the user decides
            await pilot.press("y")
            await wait_until(pilot, lambda: idle(app), what="the reply")
            assert marker.read_text() == "confirmed\n"
            assert calls(app)[-1].result.ok and "[exit status 0]" in calls(app)[-1].result_text

            await send(pilot, app, "Once more.")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmCommand), what="the dialog")
            await pilot.press("n")
            await wait_until(pilot, lambda: idle(app), what="the reply")
            assert marker.read_text() == "confirmed\n"  # refused: it did not run again
            refused = calls(app)[-1].result
            assert refused.refused and "declined" in refused.content

    run(go())
    app.chat_tools.close()


def test_loop_is_cut_at_the_cap(backend, home):
    settings = ToolSettings(max_calls=3)  # the date/time tool is on by default
    app = make_app(backend, home, settings, Forced("required", rounds=100))

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "What time is it?")
            await wait_until(pilot, lambda: idle(app), what="the reply")
            loop = app.tool_loops[-1]
            assert loop.calls_made == 3 and loop.cut
            assert [v.label for v in calls(app)] == ["current_datetime()"] * 3
            assert all(v.result.ok for v in calls(app))
            assert app.store.messages(app.chat.id)[-1].state == DONE

    run(go())
    app.chat_tools.close()


def test_escape_stops_a_tool_loop(backend, home):
    """Esc while the first call runs: the loop stops there. The call waits until Esc was pressed (a busy
    machine could otherwise let the loop run on past the test's first look)."""
    settings = ToolSettings(max_calls=50)
    app = make_app(backend, home, settings, Forced("required", rounds=100))
    pressed = threading.Event()
    toolbox = app.chat_tools.toolbox

    def held_toolbox(*args, **kwargs):
        box, search = toolbox(*args, **kwargs)
        now = box.tools["current_datetime"]

        def run_after_escape(arguments):  # noqa: ANN001, ANN202
            pressed.wait(30)
            return now.run(arguments)

        box.tools["current_datetime"] = dataclasses.replace(now, run=run_after_escape)
        return box, search

    app.chat_tools.toolbox = held_toolbox

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "What time is it?")
            await wait_until(pilot, lambda: len(calls(app)) >= 1, what="a first call")
            await pilot.press("escape")
            pressed.set()
            await wait_until(pilot, lambda: idle(app), what="the reply to stop")
            loop = app.tool_loops[-1]
            assert loop.cancel_requested.is_set() and loop.calls_made < 50 and not loop.cut
            assert app.store.messages(app.chat.id)[-1].state == CANCELLED

    run(go())
    app.chat_tools.close()


def test_mcp_server_is_listed_and_called(backend, home):
    log = home / "words.txt"
    server = McpServerConfig("words", sys.executable, [str(MCP_SERVER)], env={"MCP_TEST_LOG": str(log)})
    app = make_app(backend, home, ToolSettings(mcp=[server]), pinned("words__remember_word", word="kiwi"))

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "/tools on words")
            listed = lambda: getattr(app, "tools_listed", None)  # noqa: E731
            await wait_until(
                pilot, lambda: listed() is not None and "words__add" in listed().tools, what="list"
            )
            assert {"words__add", "words__remember_word"} <= listed().on  # the server's tools, now on
            assert app.chat.params["tools"] == {"words": True}  # kept with the chat
            await send(pilot, app, "Remember kiwi.")
            await wait_until(pilot, lambda: idle(app) and calls(app), what="the reply")
            view = calls(app)[0]
            assert view.label == 'words__remember_word(word="kiwi")'
            assert view.result.ok and "remembered 'kiwi'" in view.result_text
            assert log.read_text() == "kiwi\n"  # the server process did it

            await send(pilot, app, "/tools off words")
            assert app.chat.params["tools"] == {"words": False}

    run(go())
    app.chat_tools.close()


def test_document_search_tool_cites_its_passages(backend, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "kv.md").write_text(
        "The paged KV cache stores keys and values in fixed-size blocks.\n"
        "A block table maps each sequence to its blocks.\n"
    )
    p = ripe("index", str(tmp_path / "docs"), "--collection", "notes", home=home)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("RIPELM_HOME", str(home))
    app = make_app(backend, home, ToolSettings(), pinned("search_documents", query="paged KV cache"))

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            app.chat = app.store.update_chat(app.chat.id, collection="notes")
            await send(pilot, app, "How are keys stored?")
            await wait_until(pilot, lambda: idle(app) and calls(app), what="the reply")
            view = calls(app)[0]  # on by default in a chat with a collection: the model chose (forced) it
            assert view.label == 'search_documents(query="paged KV cache")'
            assert view.result_text.startswith("[1] The paged KV cache stores keys")
            reply = app.store.messages(app.chat.id)[-1]
            assert reply.sources and reply.sources[0]["number"] == 1
            assert reply.sources[0]["path"].endswith("kv.md")  # stored with the reply, as citations are

    run(go())
    app.chat_tools.close()


def test_tools_call_forces_the_next_reply_only(backend, home):
    app = make_app(backend, home, ToolSettings(), None)  # a tool without arguments: a random model's
    # string arguments run on to the token limit

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "/tools call current_datetime")
            assert app.force_next is not None
            await send(pilot, app, "What day is it?")
            await wait_until(pilot, lambda: idle(app) and calls(app), what="the reply")
            assert calls(app)[0].label == "current_datetime()" and calls(app)[0].result.ok
            assert app.force_next is None and app.tool_loops[-1].calls_made >= 1
            await send(pilot, app, "/tools call run_shell")  # off in this chat: a notice, no call
            await send(pilot, app, "Run something.")
            await wait_until(pilot, lambda: idle(app) and len(app.tool_loops) == 2, what="the second reply")
            assert app.tool_loops[-1].force is None and not any("run_shell" in v.label for v in calls(app))

    run(go())
    app.chat_tools.close()
