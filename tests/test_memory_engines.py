"""Memory enters the prompt on every engine: `ripe chat --plain` on the native engine and on llama.cpp
(the memory commands, a stated fact saved, recalled in a later session), and the chat app with
`--engine openai` against a real `ripe serve` process (the server's prompt grows by the memory)."""

from __future__ import annotations

import asyncio

import pytest
from openai_servers import ripe_serve
from retrieval_helpers import make_home, ripe
from tui_helpers import idle, wait_until

from ripelm.chat_store import ChatStore
from ripelm.runtime.openai_backend import OpenAIBackend
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool


@pytest.mark.parametrize("engine", ["native", "llama.cpp"])
def test_plain_chat_memory(tiny_model_factory, tmp_path, engine):
    model = tiny_model_factory(qtype="Q4_0", n_layers=2)
    home = make_home(tmp_path / "home")
    base = ["chat", "--plain", "--model", str(model), "--engine", engine, "--temp", "0", "--max-tokens", "4"]
    p = ripe(*base, home=home, stdin="Hi. My project uses Postgres.\n/remember I live in Lyon\n/memories\n")
    assert p.returncode == 0, p.stderr
    assert "[remembered #1: The user's project uses Postgres." in p.stdout
    assert "remembered #2: I live in Lyon" in p.stdout
    assert "#1 The user's project uses Postgres." in p.stdout and "#2 I live in Lyon" in p.stdout

    # a later session: the fact is recalled into the prompt of a question about it
    p = ripe(*base, home=home, stdin="Which database does my project use?\n/forget 1\n/memories\n")
    assert p.returncode == 0, p.stderr
    assert "1 memories recalled" in p.stderr
    assert "forgot #1: The user's project uses Postgres." in p.stdout
    p = ripe(*base, home=home, stdin="/memory off\nWhere do I live?\n/memory\n")
    assert "memories recalled" not in p.stderr and "memory is off for this chat" in p.stdout


def test_openai_engine_memory_in_the_servers_prompt(tiny_model_factory, tmp_path, monkeypatch):
    model = tiny_model_factory(qtype="Q4_0", n_layers=2)
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("RIPELM_HOME", str(home))
    with ripe_serve(model, tmp_path / "serve-home") as (url, _):
        backend = OpenAIBackend(url)

        async def go() -> None:
            store = ChatStore(home / "chats.db")
            pool = BackendPool(lambda model, draft: backend, initial=backend)
            app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=4))
            async with app.run_test(size=(100, 30)) as pilot:
                prompt_tokens = []

                async def ask(text: str) -> None:
                    started = app.replies_started
                    app.query_one("#prompt").value = text
                    await pilot.press("enter")
                    await wait_until(pilot, lambda: app.replies_started > started and idle(app), what="reply")
                    prompt_tokens.append(store.messages(app.chat.id)[-1].stats["prompt_tokens"])

                app.query_one("#prompt").value = "/remember The user's name is Sam."
                await pilot.press("enter")
                await app.memory_command("/memory off")
                await ask("What is my name?")  # the first message of a chat without memory
                await app.action_new_chat()
                await ask("What is my name?")  # the same, first in a chat with memory
                reply = store.messages(app.chat.id)[-1]
                assert reply.stats["memories"] == [store.memories()[0].id]
                assert "The user's name is Sam." in app.recalled_turns[-1]["content"]
                # the server saw it: the same question, now with the memory in front of it
                assert prompt_tokens[1] > prompt_tokens[0] + 10, prompt_tokens

        asyncio.run(go())
        backend.close()
