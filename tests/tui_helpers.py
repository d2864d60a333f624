"""Helpers for driving the chat app with Textual's Pilot: poll for a condition with a deadline (no sleeps)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ripelm.tui.app import RipeApp
from ripelm.tui.messages import CancelAcknowledged


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


class ObservedApp(RipeApp):
    """The chat app, recording what it shows the user: notifications, and the cancel acknowledgements the
    app posts to itself (Textual also runs RipeApp's own handler for each)."""

    CSS_PATH = str(Path(inspect.getfile(RipeApp)).with_name(str(RipeApp.CSS_PATH)))  # Textual: relative to
    # the file of the instance's class, and this one lives in tests/

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notices: list[str] = []
        self.cancel_acks: list[CancelAcknowledged] = []

    def notify(self, message: str, *args: Any, **kwargs: Any) -> None:
        self.notices.append(str(message))
        super().notify(message, *args, **kwargs)

    def on_cancel_acknowledged(self, event: CancelAcknowledged) -> None:
        self.cancel_acks.append(event)


def trim_notices(app: ObservedApp) -> int:
    """How often the app told the user that the chat was trimmed to fit the context window."""
    return sum("no longer fits the context window" in notice for notice in app.notices)
