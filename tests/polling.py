"""Poll a condition with a deadline instead of sleeping a fixed time (threads, servers, the engine)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 60.0) -> bool:
    """True as soon as `predicate()` is truthy; its last value's truth after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
