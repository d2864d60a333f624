"""`ripe serve` holding several models of the store, loaded on demand by name and unloaded when their
keep-alive runs out (on /api/ps, on `ripe ps` and in the server's memory), `ripe stop`, and the memory
budget; the server runs as a separate process, driven by the official `ollama` client."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
from openai_servers import ripe_serve
from polling import wait_until

ollama = pytest.importorskip("ollama")

from ripelm.models.blobstore import ModelStore  # noqa: E402
from ripelm.models.gguf_file import open_gguf  # noqa: E402
from ripelm.models.store import bundled_model_path  # noqa: E402

OPTS = {"temperature": 0, "num_predict": 4}
MSG = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_factory):
    h = tmp_path_factory.mktemp("pool-home")
    tiny = tiny_model_factory(qtype="Q4_0", n_layers=2)
    ModelStore(h / "models").import_file(tiny, "tiny:test", validate=lambda p: open_gguf(p).close())
    return h


def ripe(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, RIPELM_HOME=str(home)),
        timeout=120,
    )


def loaded(client) -> list[str]:
    return sorted(m.model for m in client.ps().models)


def test_two_models_at_once_then_keep_alive_unloads_one(home):
    with ripe_serve("tiny:test", home, "--ctx", "512", "--kv-memory", "16M") as (url, proc):
        base = url.removesuffix("/v1")
        client = ollama.Client(host=base)
        assert loaded(client) == ["tiny:test"]
        server = psutil.Process(proc.pid)
        before = server.memory_info().rss

        answers: dict[str, str] = {}

        def chat(model: str, keep: str | None) -> None:
            r = ollama.Client(host=base).chat(model=model, messages=MSG, options=OPTS, keep_alive=keep)
            answers[model] = r.message.content

        threads = [
            threading.Thread(target=chat, args=("smollm2:135m", "15s")),
            threading.Thread(target=chat, args=("tiny:test", None)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers["smollm2:135m"] and answers["tiny:test"]
        assert loaded(client) == ["smollm2:135m", "tiny:test"]
        smol = next(m for m in client.ps().models if m.model == "smollm2:135m")
        file = bundled_model_path().stat().st_size
        assert file + (15 << 20) < smol.size <= file + (16 << 20)  # the file and its 16M K/V pool
        listing = ripe(home, "ps", "--server", base)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert lines[0].split()[0] == "NAME" and len(lines) == 3
        assert "Forever" in next(line for line in lines if line.startswith("tiny:test"))
        assert "seconds from now" in next(line for line in lines if line.startswith("smollm2:135m"))
        with_both = server.memory_info().rss
        assert with_both - before > 50 << 20  # the 98 MB model is in memory

        assert wait_until(lambda: loaded(client) == ["tiny:test"], timeout=60)  # 15 s idle: unloaded
        after = server.memory_info().rss
        assert with_both - after > 40 << 20, (before, with_both, after)
        assert "smollm2:135m" not in ripe(home, "ps", "--server", base).stdout

        # `ripe stop` unloads even the model named at start; the next request loads it again
        stopped = ripe(home, "stop", "tiny:test", "--server", base)
        assert stopped.returncode == 0 and "stopped tiny:test" in stopped.stdout
        assert loaded(client) == []
        missing = ripe(home, "stop", "tiny:test", "--server", base)
        assert missing.returncode == 1 and "not loaded" in missing.stderr
        again = client.generate(model="tiny:test", prompt="Once upon a time", options=OPTS)
        assert again.done and loaded(client) == ["tiny:test"]


def test_an_idle_model_makes_room_within_the_memory_budget(home):
    smol, kv = bundled_model_path().stat().st_size, 16 << 20  # each model's K/V pool: 16 MiB
    budget = str(smol + 2 * kv + smol // 2)  # room for the bundled model and the tiny one, not two bundled
    args = ("--ctx", "512", "--kv-memory", str(kv), "--memory-budget", budget)
    with ripe_serve("tiny:test", home, *args) as (url, _):
        base = url.removesuffix("/v1")
        client = ollama.Client(host=base)
        ModelStore(home / "models").import_file(
            bundled_model_path(), "smol:copy", validate=lambda p: open_gguf(p).close()
        )
        client.chat(model="smollm2:135m", messages=MSG, options=OPTS, keep_alive="10m")
        assert loaded(client) == ["smollm2:135m", "tiny:test"]
        size = {m.model: m.size for m in client.ps().models}["smollm2:135m"]
        assert smol + kv - (1 << 20) < size <= smol + kv  # as /api/ps counts it: the file and its K/V pool
        time.sleep(0.05)
        client.chat(model="smol:copy", messages=MSG, options=OPTS)  # the idle bundled model goes first
        assert loaded(client) == ["smol:copy", "tiny:test"]


def test_ps_without_a_server_says_so(home):
    out = ripe(home, "ps", "--server", "http://127.0.0.1:9")
    assert out.returncode == 1 and "no ripe serve is running at http://127.0.0.1:9" in out.stderr


def test_the_openai_routes_serve_a_store_model_by_name(home):
    openai = pytest.importorskip("openai")
    with ripe_serve("tiny:test", home, "--ctx", "512") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        args = {"messages": MSG, "temperature": 0, "max_tokens": 4}
        smol = c.chat.completions.create(model="smollm2:135m", **args)
        assert smol.model == "smollm2:135m" and smol.choices[0].message.content
        assert loaded(ollama.Client(host=url.removesuffix("/v1"))) == ["smollm2:135m", "tiny:test"]
        streamed = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(model="smollm2:135m", stream=True, **args)
            if ch.choices
        )
        assert streamed == smol.choices[0].message.content  # the same model, greedy
        # a name the store does not know (clients that send their own) keeps the model served at start
        assert c.chat.completions.create(model="gpt-4o", **args).model == "tiny:test"
