"""`ripe serve` through the official `openai` client and raw HTTP, on the real engine and a tiny model."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
from polling import wait_until

openai = pytest.importorskip("openai")

from ripelm.runtime.engine_backend import EngineBackend  # noqa: E402
from ripelm.server import Server  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def tiny_path(tiny_model_factory):
    return tiny_model_factory(qtype="Q4_0", n_layers=2)


@pytest.fixture(scope="module")
def served(tiny_path):
    backend = EngineBackend(tiny_path, device="cpu", n_ctx=1024, kv_memory=32 << 20)
    server = Server(backend, host="127.0.0.1", port=0, api_key=KEY, model_name="tiny:test")
    server.start()
    yield server, backend
    server.close()
    backend.close()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0)


def chat(c: openai.OpenAI, text: str, *, stream: bool, max_tokens: int = 12) -> str:
    args = dict(
        model="tiny:test", messages=[{"role": "user", "content": text}], temperature=0, max_tokens=max_tokens
    )
    if not stream:
        return c.chat.completions.create(**args).choices[0].message.content
    parts = []
    for chunk in c.chat.completions.create(stream=True, **args):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def test_models_and_a_streamed_chat_completion(served):
    server, _ = served
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny:test"]
    streamed = chat(c, "Tell me about the sea.", stream=True)
    assert streamed and streamed == chat(c, "Tell me about the sea.", stream=False)
    done = c.completions.create(model="tiny:test", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 5


def test_eight_concurrent_streams_each_match_their_lone_result(served):
    server, _ = served
    c = client(server)
    prompts = [f"Question {i}: what colour is the number {i * 7}?" for i in range(8)]
    alone = [chat(c, p, stream=True) for p in prompts]
    results: list[str | None] = [None] * 8

    def worker(i: int) -> None:
        results[i] = chat(client(server), prompts[i], stream=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == alone


def test_a_client_that_disconnects_frees_its_blocks(served):
    server, backend = served
    body = json.dumps(
        {
            "model": "tiny:test",
            "prompt": "Once upon a time " * 20,
            "max_tokens": 900,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    events = 0
    while events < 3:
        events += reader.readline().startswith(b"data: ")
    assert backend.engine.snapshot().used_blocks > 0
    reader.close()
    sock.close()  # the client goes away mid-stream
    assert wait_until(lambda: backend.engine.snapshot().used_blocks == 0)
    assert chat(client(server), "Still there?", stream=False)  # the server carries on


def test_errors_are_json_with_status(served):
    server, _ = served

    def post(path: str, payload: bytes, key: str = KEY) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", path, payload, {"Authorization": f"Bearer {key}"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    assert post("/v1/chat/completions", b"{not json")[0] == 400
    assert post("/v1/chat/completions", json.dumps({"messages": []}).encode())[0] == 400
    assert (
        post(
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(),
        )[0]
        == 400
    )
    status, err = post("/v1/completions", json.dumps({"prompt": "x"}).encode(), key="wrong")
    assert status == 401 and "API key" in err["error"]["message"]
    assert post("/v1/nothing", b"{}")[0] == 404
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0
        ).models.list()


def test_ripe_run_engine_openai_against_ripe_serve_process(tiny_path, tmp_path):
    env = dict(os.environ, RIPELM_HOME=str(tmp_path))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ripelm.cli",
            "serve",
            "--model",
            str(tiny_path),
            "--port",
            "0",
            "--ctx",
            "1024",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}/v1"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "ripelm.cli",
                "run",
                "Say something.",
                "--engine",
                "openai",
                "--base-url",
                url,
                "--temp",
                "0",
                "-n",
                "8",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_speculating_server_returns_the_same_text_and_reports_its_proposals(served, tiny_path):
    """`ripe serve --speculate ngram`: prompt lookup inside the engine (fixed k here, so the tiny model's
    loops are proposed from the first step); the same completion as the plain server, and the usage says
    how many proposed tokens were accepted and rejected, in OpenAI's completion_tokens_details fields."""
    plain_server, _ = served
    backend = EngineBackend(
        tiny_path, device="cpu", n_ctx=1024, kv_memory=32 << 20, speculate="ngram", spec_adaptive=False
    )
    server = Server(backend, host="127.0.0.1", port=0, api_key=KEY, model_name="tiny:test")
    server.start()
    try:
        prompt = "one two three one two three one two three one two"
        args = dict(model="tiny:test", prompt=prompt, max_tokens=48, temperature=0)
        want = client(plain_server).completions.create(**args)
        got = client(server).completions.create(**args)
        assert got.choices[0].text == want.choices[0].text
        details = got.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 0
        assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
        assert want.usage.completion_tokens_details is None
    finally:
        server.close()
        backend.close()
