"""Helpers for driving the chat app with Textual's Pilot: poll for a condition with a deadline (no sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    pilot: Any, predicate: Callable[[], bool], timeout: float = 60.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await pilot.pause(0.01)


def streaming(app: Any) -> bool:
    return app.reply is not None


def idle(app: Any) -> bool:
    return app.reply is None
