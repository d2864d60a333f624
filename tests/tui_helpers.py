"""Helpers for driving the chat app with Textual's Pilot: poll for a condition with a deadline (no sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    pilot: Any, predicate: Callable[[], bool], timeout: float = 60.0, what: str = "", poll: float = 0.01
) -> None:
    """`poll`: seconds between checks. Each check also lets the app process its pending messages, so a
    test that measures the app's speed polls rarely (the polling is the harness's work, not the app's)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await pilot.pause(poll)


def streaming(app: Any) -> bool:
    return app.reply is not None


def idle(app: Any) -> bool:
    return app.reply is None
