"""`--engine openai` keeps a conversation inside the server's context window: fitted before sending when
the server's model listing gives the window (`max_model_len`, as `ripe serve` and vLLM list it), else
fitted after the server refuses the prompt (HTTP 400) and retried once; the user is told. Against a real
`ripe serve` with a 256-token window, running as a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from openai_servers import ripe_serve

from ripelm.remote_fit import fit_before_sending, remote_reply
from ripelm.runtime.errors import ContextOverflowError
from ripelm.runtime.openai_backend import OpenAIBackend
from ripelm.runtime.sampling import SamplingParams

CTX = 256
PARAMS = SamplingParams(temperature=0.0, max_tokens=8)
SYSTEM = {"role": "system", "content": "You answer in one word."}


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory(qtype="Q4_0", n_layers=2)
    with ripe_serve(model, tmp_path_factory.mktemp("serve-home"), "--ctx", str(CTX)) as (url, _):
        yield url


def long_chat(turns: int) -> list[dict[str, str]]:
    """A system prompt, `turns` finished exchanges of ~40 words each, then the newest question."""
    out = [SYSTEM]
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i}: " + "tell me about bread " * 8})
        out.append({"role": "assistant", "content": f"answer {i}: " + "bread is baked dough " * 8})
    return out + [{"role": "user", "content": "and what about butter?"}]


def ripe(*args: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home))
    for key in ("OPENAI_API_KEY", "RIPELM_OPENAI_API_KEY"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args], capture_output=True, text=True, input=stdin, env=env,
        timeout=300,
    )  # fmt: skip


def test_ripe_serve_lists_its_context_window(server):
    with urllib.request.urlopen(f"{server}/models", timeout=30) as r:
        listing = json.load(r)
    assert [m["max_model_len"] for m in listing["data"] if m["kind"] == "chat" and m["loaded"]] == [CTX]
    backend = OpenAIBackend(server)
    try:
        assert backend.context_length == CTX
    finally:
        backend.close()


def test_a_chat_too_long_for_the_window_is_refused_with_the_numbers(server):
    backend = OpenAIBackend(server)
    try:
        with pytest.raises(ContextOverflowError) as caught:
            list(backend.stream_chat(long_chat(10), PARAMS))
    finally:
        backend.close()
    assert caught.value.context_length == CTX and caught.value.prompt_tokens > CTX


def test_known_window_fits_the_chat_before_sending(server):
    messages = long_chat(10)
    backend = OpenAIBackend(server)
    trims: list[int] = []
    try:
        sent = fit_before_sending(backend, messages, PARAMS)
        events = list(remote_reply(backend, messages, PARAMS, on_trim=trims.append))
    finally:
        backend.close()
    assert sent[0] == SYSTEM and sent[-1] == messages[-1]  # the system prompt and the question stay
    assert sent[1]["role"] == "user" and len(sent) < len(messages)  # whole turns left out from the front
    assert trims == [len(messages) - len(sent)]
    done = events[-1]
    assert done.done and done.stats is not None and 0 < done.stats.prompt_tokens < CTX
    assert backend.tokens_per_byte is not None  # measured from the server's usage, for the next turn


def test_unknown_window_is_learned_from_the_refusal_and_retried_once(server):
    """A server whose listing gives no window (llama.cpp's, OpenAI's): the first request is refused, the
    retry leaves the oldest turns out and is answered; the window is known from then on."""
    messages = long_chat(10)
    backend = OpenAIBackend(server)
    backend.context_length = None  # what a client of a server without `max_model_len` knows
    trims: list[int] = []
    try:
        events = list(remote_reply(backend, messages, PARAMS, on_trim=trims.append))
        assert backend.context_length == CTX
        again = list(remote_reply(backend, messages, PARAMS, on_trim=trims.append))  # fitted up front now
    finally:
        backend.close()
    assert events[-1].done and 0 < events[-1].stats.prompt_tokens < CTX
    assert again[-1].done and 0 < again[-1].stats.prompt_tokens < CTX
    assert len(trims) == 2 and all(0 < n < len(messages) - 1 for n in trims)


def test_a_last_message_too_long_is_one_error_line(server, tmp_path):
    p = ripe(
        "run", "--engine", "openai", "--base-url", server, "--max-tokens", "8", "bread " * 400, home=tmp_path
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("ripe: error: ") and "context window" in lines[0]


def test_plain_chat_tells_the_user_when_old_turns_are_left_out(server, tmp_path):
    turns = "".join(f"question {i}: " + "tell me about bread " * 10 + "\n" for i in range(6))
    p = ripe(
        "chat", "--plain", "--engine", "openai", "--base-url", server, "--temp", "0", "--max-tokens", "8",
        home=tmp_path, stdin=turns,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "earliest messages left out" in p.stderr
    assert p.stdout.count(">>> ") == 7  # every question was answered, then EOF
