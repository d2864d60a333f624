"""`--engine openai` against a server no one here wrote: llama-cpp-python's own OpenAI-compatible server
(`python -m llama_cpp.server`) running the bundled model as a real subprocess on a loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from openai_servers import free_port, llama_cpp_server

from ripelm.runtime.errors import BackendError
from ripelm.runtime.openai_backend import OpenAIBackend, normalize_base_url
from ripelm.runtime.sampling import SamplingParams

KEY = "test-key-123"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def llama_server(bundled_model_path: Path, tmp_path_factory):
    pytest.importorskip(
        "uvicorn", reason="llama-cpp-python's server needs the dev extra (uvicorn, fastapi...)"
    )
    pytest.importorskip("sse_starlette")
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with llama_cpp_server(bundled_model_path, log, KEY) as url:
        yield url


def ripe(*args: str, home: Path, stdin: str | None = None, env: dict | None = None):
    e = dict(os.environ, RIPELM_HOME=str(home), **(env or {}))
    for k in ("OPENAI_API_KEY", "RIPELM_OPENAI_API_KEY"):
        if not env or k not in env:
            e.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=e,
        timeout=300,
    )


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("ripe: error: ")
    return lines[0]


def test_streams_chat_as_several_events_with_stats(llama_server):
    backend = OpenAIBackend(llama_server, api_key=KEY)
    try:
        assert backend.model  # the first (only) model the server lists
        params = SamplingParams(temperature=0.0, max_tokens=12)
        events = list(backend.stream_chat([{"role": "user", "content": PROMPT}], params))
    finally:
        backend.close()
    texts = [e.text for e in events if not e.done]
    assert len(texts) >= 5 and "".join(texts).strip()  # streamed piece by piece, not in one block
    final = events[-1]
    assert final.done and final.stats is not None
    assert final.stats.engine == "openai" and final.stats.generated_tokens >= 5
    assert final.stats.finish_reason in ("stop", "length") and final.stats.ttft_s > 0


def test_ripe_run_engine_openai(llama_server, tmp_path):
    p = ripe(
        "run", "--engine", "openai", "--base-url", llama_server, "--api-key", KEY,
        "--temp", "0", "--max-tokens", "12", "--stats", PROMPT, home=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "engine openai" in p.stderr and "decode" in p.stderr


def test_ripe_run_raw_completion_and_env_key(llama_server, tmp_path):
    base = llama_server.removesuffix("/v1")  # no /v1: ripe adds it
    p = ripe(
        "run", "--engine", "openai", "--base-url", base, "--raw", "--temp", "0", "--max-tokens", "12",
        "Once upon a time", home=tmp_path, env={"RIPELM_OPENAI_API_KEY": KEY},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def test_ripe_chat_from_config_file(llama_server, tmp_path):
    (tmp_path / "config.toml").write_text(
        f'engine = "openai"\n\n[openai]\nbase_url = "{llama_server}"\napi_key = "{KEY}"\n'
    )
    p = ripe("chat", "--temp", "0", "--max-tokens", "8", home=tmp_path, stdin="Hello!\nWhat is 2+2?\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert "ripe chat — openai on" in p.stdout and llama_server in p.stdout
    answers = p.stdout.split(">>> ")[1:]
    assert len(answers) == 3 and answers[0].strip() and answers[1].strip()  # two replies, then /exit
    assert p.stderr.count("tok/s") == 2


def test_wrong_key_and_unreachable_server_are_one_line_errors(llama_server, tmp_path):
    bad = ripe(
        "run", "--engine", "openai", "--base-url", llama_server, "--api-key", "nope", "hi", home=tmp_path
    )
    assert "refused the API key" in one_error_line(bad)
    down = f"http://127.0.0.1:{free_port()}/v1"
    gone = ripe("run", "--engine", "openai", "--base-url", down, "hi", home=tmp_path)
    assert "cannot reach the server" in one_error_line(gone)
    none = ripe("run", "--engine", "openai", "hi", home=tmp_path)
    assert "needs --base-url" in one_error_line(none)
    local = ripe("run", "--base-url", llama_server, "hi", home=tmp_path)
    assert "are for --engine openai" in one_error_line(local)


def test_base_url_normalization():
    assert normalize_base_url("http://h:8080") == "http://h:8080/v1"
    assert normalize_base_url("http://h:8080/v1/") == "http://h:8080/v1"
    assert normalize_base_url("https://h/api/v1") == "https://h/api/v1"
    with pytest.raises(BackendError, match="http"):
        normalize_base_url("h:8080")


def test_bad_config_is_a_one_line_error(tmp_path):
    (tmp_path / "config.toml").write_text('engine = "warp"\n')
    assert "engine must be one of" in one_error_line(ripe("run", "hi", home=tmp_path))
    (tmp_path / "config.toml").write_text("[openai]\nbase_url = 5\n")
    assert "'base_url' must be a str" in one_error_line(ripe("run", "hi", home=tmp_path))
    (tmp_path / "config.toml").write_text("modle = 'x'\n")
    assert "unknown settings: modle" in one_error_line(ripe("run", "hi", home=tmp_path))


def test_cancel_during_a_long_prefill_ends_the_stream_at_once(llama_server):
    """A cancel while the server is still reading the prompt (no chunk has come yet) drops the connection
    then and there, instead of when the first token arrives."""
    backend = OpenAIBackend(llama_server, api_key=KEY)
    long_prompt = " ".join(f"Item {i} of a long list that the server has to read first." for i in range(110))
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    try:
        t0 = time.monotonic()
        params = SamplingParams(temperature=0.0, max_tokens=8)
        events = list(backend.stream_chat([{"role": "user", "content": long_prompt}], params, cancel))
        took = time.monotonic() - t0
    finally:
        backend.close()
    final = events[-1]
    assert final.done and final.stats.finish_reason == "cancelled"
    assert [e for e in events if not e.done] == []  # nothing came before the cancel
    assert took < 1.5, took  # the prefill of ~1,500 tokens takes the server several seconds here
