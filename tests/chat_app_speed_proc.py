"""The chat app's decode speed, in a process of its own: `python chat_app_speed_proc.py MODEL PROMPT TOKENS
DIR` drives the app with Pilot for two replies and prints the status bar's tok/s of each as one JSON line. A
process of its own, as `ripe chat` and `ripe run` are: nothing else of the test session runs beside it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tui_helpers import idle, wait_until

from ripelm.chat_store import ChatStore
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.app import RipeApp
from ripelm.tui.backends import BackendPool


def main(model: str, prompt: str, tokens: int, home: Path) -> None:
    pool = BackendPool(lambda name, draft: EngineBackend(model, device="cpu", n_ctx=2048))
    backend = pool.get(None, None)
    if backend.engine.native is None:
        print(json.dumps({"skip": "the native library is not available"}))
        return
    speeds: list[float] = []

    async def go() -> None:
        store = ChatStore(home / "chats.db")
        app = RipeApp(store, pool, SamplingParams(temperature=0, max_tokens=tokens))
        async with app.run_test(size=(100, 30)) as pilot:
            for _ in range(2):
                await pilot.press("ctrl+n")
                app.query_one("#prompt").value = prompt
                await pilot.press("enter")

                def replied() -> bool:
                    return idle(app) and any(m.role == "assistant" for m in app.store.messages(app.chat.id))

                # rare polls: each one also runs the app's message loop, the harness's work, not the app's
                await wait_until(pilot, replied, timeout=300, what="the reply", poll=0.25)
                speeds.append(app.query_one("#status").numbers.tok_s)
        store.close()

    try:
        asyncio.run(go())
    finally:
        pool.close()
    print(json.dumps({"tok_s": speeds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
