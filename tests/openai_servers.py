"""OpenAI-compatible servers as real subprocesses on loopback ports, for the `--engine openai` tests:
`ripe serve` (ours) and llama-cpp-python's `python -m llama_cpp.server` (one no one here wrote)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def ripe_serve(
    model: Path | str | None,
    home: Path,
    *extra: str,
    embeddings: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ripe serve --port 0` (no embeddings unless asked) on MODEL, or on the bundled model (served as
    smollm2:135m) for None; yields its /v1 URL (read from the line it prints once it listens) and the
    process. `env` adds environment variables."""
    model_args = ["--model", str(model)] if model is not None else []
    no_emb = [] if embeddings else ["--no-embeddings"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ripelm.cli", "serve", *model_args, "--port", "0", *no_emb, *extra],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, RIPELM_HOME=str(home), **(env or {})),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the first line: where it listens, or why it could not start
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if m is None:
            raise RuntimeError(f"ripe serve did not start: {line}{proc.stderr.read()[-2000:]}")
        yield f"http://127.0.0.1:{m.group(1)}/v1", proc
    finally:
        _stop(proc)


@contextmanager
def llama_cpp_server(model: Path, log: Path, api_key: str, *extra: str, n_ctx: int = 2048) -> Iterator[str]:
    """`python -m llama_cpp.server` on MODEL (it needs the dev extra: uvicorn, fastapi, sse_starlette);
    yields its /v1 URL once /v1/models answers."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "2", "--api_key", api_key, *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"})
            try:
                with urllib.request.urlopen(req, timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama_cpp.server did not start:\n{log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)  # polling a server that is starting, with a deadline
        yield url
    finally:
        _stop(proc)
