"""The chat app over `--engine openai`, driven with Pilot and wired as `ripe chat` wires it (`open_pool` from
the parsed command line): against `ripe serve` running as a separate process (a full reply stored in
the chat DB, Esc mid-stream keeping the partial text), against a server that goes down (one error in
the app, which goes on), a server that stalls mid-reply (Esc still stops at once), and against
llama-cpp-python's own server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai_servers import free_port, llama_cpp_server, ripe_serve
from tui_helpers import ObservedApp, idle, trim_notices, wait_until

from ripelm.chat_cli import open_pool
from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import CANCELLED, DONE, ERROR
from ripelm.cli import build_parser
from ripelm.commands import sampling_from_args
from ripelm.config import load_config
from ripelm.runtime.errors import BackendError
from ripelm.tui.app import RipeApp
from ripelm.tui.message_view import MessageView
from ripelm.tui.status_bar import StatusBar, render_status

SIZE = (100, 30)
SERVED_NAME = "smollm2:135m"  # what `ripe serve` calls the bundled model at /v1/models
LLAMA_KEY = "tui-key-456"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    for key in ("OPENAI_API_KEY", "RIPELM_OPENAI_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def served(bundled_model_path, tmp_path_factory):
    """`ripe serve` on the bundled model, a separate process: a real model writes a long story when asked,
    so a reply is still streaming when a test presses Esc."""
    with ripe_serve(None, tmp_path_factory.mktemp("serve-home")) as (url, _):
        yield url


def open_app(home, *argv: str) -> ObservedApp:
    """The app as `ripe chat --engine openai ARGV...` builds it (without taking over the terminal)."""
    args = build_parser().parse_args(["chat", "--engine", "openai", "--temp", "0", *argv])
    pool, choices, default_model = open_pool(args, load_config())
    return ObservedApp(
        ChatStore(home / "chats.db"),
        pool,
        sampling_from_args(args),
        model_choices=choices,
        default_model=default_model,
    )


async def send(pilot, app: RipeApp, text: str) -> None:
    started = app.replies_started
    app.query_one("#prompt").value = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.replies_started > started, what="the reply to start")


def status(app: RipeApp) -> str:
    return render_status(app.query_one(StatusBar).numbers)


def close(app: RipeApp) -> None:
    app.pool.close()
    app.store.close()


def test_replies_from_ripe_serve_are_streamed_and_stored(served, home):
    app = open_app(home, "--base-url", served, "--max-tokens", "12")
    assert app.model_choices == [(SERVED_NAME, f"{SERVED_NAME}  (at {served})")]  # the server's list

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            assert f"{SERVED_NAME} · openai · {served}" in status(app)
            await send(pilot, app, "What is the capital of France?")
            await wait_until(pilot, lambda: idle(app), what="the reply")
            chat = app.chat.id
            msgs = app.store.messages(chat)
            assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].state == DONE
            assert msgs[1].content.strip() and app.query(MessageView)[-1].content == msgs[1].content
            stats = msgs[1].stats
            assert stats["engine"] == "openai" and stats["finish_reason"] in ("stop", "length")
            assert 0 < stats["generated_tokens"] <= 12 and stats["prompt_tokens"] > 0  # the server's usage
            await wait_until(pilot, lambda: "ttft" in status(app), what="the reply's numbers")
            assert "tok/s" in status(app) and "KV" not in status(app) and "ctx" not in status(app)

            # a second turn sends the whole history; a chat naming a model this server does not list
            # (from a local session) talks to the server's model
            app.store.update_chat(chat, model="qwen2.5:7b")
            app.chat = app.store.chat(chat)
            await send(pilot, app, "And of Italy?")
            await wait_until(pilot, lambda: idle(app), what="the second reply")
            msgs = app.store.messages(chat)
            assert [m.role for m in msgs] == ["user", "assistant"] * 2 and msgs[3].state == DONE
            assert (
                msgs[3].stats["prompt_tokens"]
                > msgs[1].stats["prompt_tokens"] + msgs[1].stats["generated_tokens"]
            )
            assert app.pool.current().model == SERVED_NAME

            app.action_pick_draft()  # no draft models with a server: a warning, not a crash
            await wait_until(pilot, lambda: bool(app._notifications), what="the draft warning")
            assert "the server decodes" in list(app._notifications)[-1].message

    try:
        asyncio.run(go())
    finally:
        close(app)


def test_escape_stops_a_reply_from_ripe_serve_and_keeps_the_text(served, home):
    app = open_app(home, "--base-url", served, "--max-tokens", "2000")

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "Write a long story about a dragon who learns to bake bread.")
            await wait_until(pilot, lambda: len(app.reply.recorder.content) > 40, what="streaming")
            chat = app.chat.id
            await pilot.press("escape")
            await wait_until(pilot, lambda: bool(app.cancel_acks), timeout=10, what="cancel ack")
            print(f"Esc to the end of the reply: {app.cancel_acks[0].latency_s * 1000:.1f} ms")
            await wait_until(pilot, lambda: idle(app), what="the reply to end")
            reply = app.store.messages(chat)[-1]
            assert reply.state == CANCELLED and len(reply.content) > 40  # the partial text is kept
            assert reply.stats["finish_reason"] == "cancelled"
            assert 0 < reply.stats["generated_tokens"] < 2000
            view = app.query(MessageView)[-1]
            assert view.state == CANCELLED and view.content == reply.content

    try:
        asyncio.run(go())
    finally:
        close(app)


def test_a_server_that_goes_down_is_one_error_in_the_app(tiny_model_factory, home):
    down = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendError, match="cannot reach the server"):  # down at start: `ripe: error: ...`
        open_app(home, "--base-url", down)
    with pytest.raises(BackendError, match="--draft is for the local engines"):
        open_app(home, "--base-url", down, "--draft", "auto")
    with ripe_serve(tiny_model_factory(qtype="Q4_0", n_layers=2), home / "serve") as (url, proc):
        app = open_app(home, "--base-url", url, "--max-tokens", "4")

        async def go() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await send(pilot, app, "Hello")
                await wait_until(pilot, lambda: idle(app), what="the reply")
                proc.terminate()
                proc.wait(timeout=30)
                await send(pilot, app, "Are you there?")
                await wait_until(pilot, lambda: idle(app), what="the failed reply")
                errors = [n for n in app._notifications if n.severity == "error"]
                assert len(errors) == 1 and "cannot reach the server" in errors[0].message
                assert url in errors[0].message
                msgs = app.store.messages(app.chat.id)
                assert [m.state for m in msgs if m.role == "assistant"] == [DONE, ERROR]
                await pilot.press(*"still here")  # the app goes on
                assert app.query_one("#prompt").value == "still here"

        try:
            asyncio.run(go())
        finally:
            close(app)


def test_a_chat_longer_than_the_server_window_is_trimmed_and_the_user_told(tiny_model_factory, home):
    """`ripe serve --ctx 256`: the app leaves the oldest turns out (the window comes from /v1/models), the
    reply arrives, and the status bar and a notification say so, as with the local engines."""
    with ripe_serve(tiny_model_factory(qtype="Q4_0", n_layers=2), home / "serve", "--ctx", "256") as (url, _):
        app = open_app(home, "--base-url", url, "--max-tokens", "8")

        async def go() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await send(pilot, app, "Hello")
                await wait_until(pilot, lambda: idle(app), what="the first reply")
                chat = app.chat.id
                assert trim_notices(app) == 0
                for i in range(10):
                    app.store.add_message(chat, "user", f"question {i} " + "word " * 40)
                    app.store.add_message(chat, "assistant", f"answer {i} " + "word " * 40)
                await app.open_chat(chat)
                await send(pilot, app, "and now?")
                await wait_until(pilot, lambda: idle(app), what="the trimmed reply")
                reply = app.store.messages(chat)[-1]
                assert reply.state == DONE and 0 < reply.stats["prompt_tokens"] < 256
                assert trim_notices(app) == 1
                assert "earliest messages left out" in status(app)
                assert any("no longer fits the context window" in n.message for n in app._notifications)

        try:
            asyncio.run(go())
        finally:
            close(app)


def test_the_app_against_llama_cpp_server(bundled_model_path, home):
    pytest.importorskip(
        "uvicorn", reason="llama-cpp-python's server needs the dev extra (uvicorn, fastapi...)"
    )
    pytest.importorskip("sse_starlette")
    with llama_cpp_server(bundled_model_path, home / "llama-server.log", LLAMA_KEY) as url:
        app = open_app(home, "--base-url", url, "--api-key", LLAMA_KEY, "--max-tokens", "12")

        async def go() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await send(pilot, app, "What is the capital of France?")
                await wait_until(pilot, lambda: idle(app), what="the reply")
                reply = app.store.messages(app.chat.id)[-1]
                assert reply.state == DONE and reply.content.strip()
                assert reply.stats["engine"] == "openai" and reply.stats["generated_tokens"] > 0
                assert app.query(MessageView)[-1].content == reply.content
                assert f"· openai · {url}" in status(app)

        try:
            asyncio.run(go())
        finally:
            close(app)


@contextmanager
def stalling_server() -> Iterator[tuple[str, threading.Event]]:
    """A server that lists one model, starts a streamed chat reply with one chunk and then goes silent
    until released (a hung server, or one in a long prefill): fault injection at the HTTP level."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"object": "list", "data": [{"id": "stuck", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            choice = {"index": 0, "delta": {"content": "Once upon"}, "finish_reason": None}
            chunk = {
                "id": "1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "stuck",
                "choices": [choice],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            release.wait(60)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", release
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


def test_escape_stops_a_reply_from_a_server_gone_silent(home):
    with stalling_server() as (url, release):
        app = open_app(home, "--base-url", url)

        async def go() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await send(pilot, app, "Tell me a story")
                await wait_until(pilot, lambda: app.reply.recorder.content == "Once upon", what="a chunk")
                await pilot.press("escape")
                await wait_until(pilot, lambda: idle(app), timeout=5, what="the reply to stop")
                reply = app.store.messages(app.chat.id)[-1]
                assert reply.state == CANCELLED and reply.content == "Once upon"
                assert reply.stats["finish_reason"] == "cancelled" and reply.stats["generated_tokens"] == 1
                await send(pilot, app, "Another one")  # the app takes the next message
                assert app.reply is not None
                await pilot.press("escape")
                await wait_until(pilot, lambda: idle(app), timeout=5, what="the second reply to stop")

        try:
            asyncio.run(go())
        finally:
            release.set()
            close(app)
