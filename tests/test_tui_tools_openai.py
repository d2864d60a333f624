"""Tools in the chat app over `--engine openai`: the tools go to the server as OpenAI `tools` and its
streamed `tool_calls` come back as calls the app runs. The server is llama-cpp-python's own (one no one
here wrote) on the bundled model with its `chatml-function-calling` format, which forces a named
`tool_choice` with its grammar; the call's arguments are pinned with `const` in the schema sent."""

from __future__ import annotations

import asyncio

import pytest
from openai_servers import llama_cpp_server
from tui_helpers import idle, wait_until

from ripelm.assistant_tools.settings import ChatTools, ToolSettings
from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import DONE
from ripelm.runtime.openai_backend import OpenAIBackend
from ripelm.runtime.sampling import SamplingParams
from ripelm.tool_loop import Forced
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool
from ripelm.tui.tool_views import ToolCallView

KEY = "tools-key-789"


@pytest.fixture(scope="module")
def server(bundled_model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with llama_cpp_server(bundled_model_path, log, KEY, "--chat_format", "chatml-function-calling") as url:
        yield url


def test_openai_engine_tool_call_runs(server, tmp_path, monkeypatch):
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "notes.txt").write_text("buy oat milk\n")
    backend = OpenAIBackend(server, api_key=KEY)
    pool = BackendPool(lambda model, draft: backend, initial=backend)
    # one call: llama-cpp-python's server streams a named tool_choice only (not "auto")
    tools = ChatTools.from_settings(ToolSettings(on=["read_file"], folders=[str(allowed)], max_calls=1))
    app = RipeApp(
        ChatStore(tmp_path / "chats.db"), pool, SamplingParams(temperature=0, max_tokens=48), chat_tools=tools
    )
    schema = {
        "type": "object",
        "properties": {"path": {"type": "string", "const": "notes.txt"}},
        "required": ["path"],
    }
    tool = {"type": "function", "function": {"name": "read_file", "description": "", "parameters": schema}}
    app.tool_force = Forced({"type": "function", "function": {"name": "read_file"}}, tools=[tool])

    async def go() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            app.query_one("#prompt").value = "What is on my shopping list?"
            await pilot.press("enter")
            await pilot.pause()
            await wait_until(pilot, lambda: idle(app) and app.query(ToolCallView), what="the reply")
            view = app.query(ToolCallView).first()
            assert view.label == 'read_file(path="notes.txt")'
            assert view.result.ok and view.result_text == "buy oat milk\n"
            assert app.tool_loops[-1].calls_made == 1
            assert app.store.messages(app.chat.id)[-1].state == DONE

    asyncio.run(go())
    backend.close()
