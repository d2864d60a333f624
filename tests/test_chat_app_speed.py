"""The chat app decodes nearly as fast as `ripe run`: the engine's step runs without the GIL (native
library) and streamed text reaches the UI ten times a second, so the Textual thread does not starve it.
Both figures are the engine's own decode tokens/s (GenerationStats), the app's as its status bar shows
it, on the bundled model with the same greedy request. (Before the native step, the app ran at half of
`ripe run`'s speed: its UI thread and the engine thread fought for the GIL ~1,000 times per token.)"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest
from tui_helpers import idle, wait_until

from ripelm.chat_store import ChatStore
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool

PROMPT = "Write a long story about an old lighthouse keeper and the storms he lived through."
TOKENS = 320


def _ripe_run_tok_s(model, home) -> float:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ripelm.cli",
            "run",
            "-m",
            str(model),
            "--temp",
            "0",
            "--max-tokens",
            str(TOKENS),
            "--stats",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RIPELM_HOME": str(home)},
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r"generated (\d+) tok.*decode ([0-9.]+) tok/s", r.stderr)
    assert m, r.stderr
    assert int(m.group(1)) >= 64, "the reply is too short to measure"
    return float(m.group(2))


def replied(app: RipeApp) -> bool:
    """The current chat has its reply, finished."""
    return idle(app) and any(m.role == "assistant" for m in app.store.messages(app.chat.id))


def _app_tok_s(model, tmp_path) -> list[float]:
    backend = EngineBackend(model, device="cpu", n_ctx=2048)
    if backend.engine.native is None:
        backend.close()
        pytest.skip("the native library is not available: the GIL-free step is what this test measures")
    speeds: list[float] = []

    async def go() -> None:
        store = ChatStore(tmp_path / "chats.db")
        pool = BackendPool(lambda model, draft: backend, initial=backend)
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=TOKENS))
        async with app.run_test(size=(100, 30)) as pilot:
            for _ in range(2):
                await pilot.press("ctrl+n")
                app.query_one("#prompt").value = PROMPT
                await pilot.press("enter")
                await wait_until(pilot, lambda: replied(app), timeout=300, what="the reply")
                speeds.append(app.query_one("#status").numbers.tok_s)

    try:
        asyncio.run(go())
    finally:
        backend.close()
    return speeds


def test_chat_app_decode_speed_against_ripe_run(bundled_model_path, tmp_path):
    """Measures the ratio (printed; `pytest -s`). The target, within 15% of `ripe run`, is a benchmark
    figure and not asserted here (timing on a shared 2-core CI machine); the assertion guards against the
    old failure, the UI starving the engine (0.3-0.5x)."""
    run = max(_ripe_run_tok_s(bundled_model_path, tmp_path) for _ in range(2))
    app = max(_app_tok_s(bundled_model_path, tmp_path))
    print(f"\nripe run {run:.1f} tok/s, chat app {app:.1f} tok/s ({app / run:.2f}x)")
    assert app >= 0.55 * run
