"""The model the app talks to: one backend open at a time, reopened when a chat asks for another model.

`opener(model)` opens a backend for a model name or path (None: the default model); the app calls
`get` from a worker thread, since loading a model takes a moment.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Opener = Callable[[str | None], Any]


class BackendPool:
    def __init__(self, opener: Opener, *, initial: Any = None, initial_model: str | None = None):
        self._opener = opener
        self._lock = threading.Lock()
        self.model: str | None = initial_model
        self.backend: Any = initial
        self.owns = initial is None  # a backend handed in is closed by whoever opened it

    def get(self, model: str | None) -> Any:
        with self._lock:
            if self.backend is not None and model == self.model:
                return self.backend
            backend = self._opener(model)
            if self.backend is not None and self.owns:
                self.backend.close()
            self.backend, self.model, self.owns = backend, model, True
            return backend

    def current(self) -> Any:
        return self.backend

    def close(self) -> None:
        with self._lock:
            if self.backend is not None and self.owns:
                self.backend.close()
            self.backend = None
