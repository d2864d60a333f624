"""The model the app talks to: one backend open at a time, reopened when a chat asks for another model
or draft model.

`opener(model, draft)` opens a backend for a model name or path and a draft model for speculative
decoding (None: the command line's or config's default for either); the app calls `get` from a worker
thread, since loading a model takes a moment.

`ServerModels` is the opener for a server engine (`--engine openai`): the models are the server's, as
its /v1/models lists them, and opening one is only a new client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Opener = Callable[[str | None, str | None], Any]
Key = tuple[str | None, str | None]


class BackendPool:
    def __init__(self, opener: Opener, *, initial: Any = None):
        self._opener = opener
        self._lock = threading.Lock()
        self.key: Key = (None, None)
        self.backend: Any = initial
        self.owns = initial is None  # a backend handed in is closed by whoever opened it

    @property
    def model(self) -> str | None:
        return self.key[0]

    def get(self, model: str | None, draft: str | None = None) -> Any:
        with self._lock:
            if self.backend is not None and (model, draft) == self.key:
                return self.backend
            if self.backend is not None and self.owns:
                self.backend.close()  # first: two models at once may not fit in memory
            self.backend = None
            self.backend, self.key, self.owns = self._opener(model, draft), (model, draft), True
            return self.backend

    def current(self) -> Any:
        return self.backend

    def close(self) -> None:
        with self._lock:
            if self.backend is not None and self.owns:
                self.backend.close()
            self.backend = None


class ServerModels:
    """An `Opener` over an OpenAI-compatible server. The first call opens the command line's or config's
    model (else the first the server lists) and reads the server's list; later calls open a listed model
    by name. A chat naming a model the server does not list (one from a local session) gets the default,
    and a draft model is ignored: speculative decoding is the local engines' (the server decodes)."""

    def __init__(self, open_server: Callable[[str | None], Any]):
        self._open = open_server
        self.default: str | None = None
        self.listed: list[str] = []

    def __call__(self, model: str | None, draft: str | None) -> Any:
        if self.default is None:
            backend = self._open(None)
            try:
                self.listed = backend.list_models()
            except Exception:
                backend.close()
                raise
            self.default = backend.model
            return backend
        return self._open(model if model in self.listed else self.default)

    def choices(self, where: str) -> list[tuple[str, str]]:
        """(value, label) pairs for the app's model picker."""
        names = list(dict.fromkeys([*([self.default] if self.default else []), *self.listed]))
        return [(n, f"{n}  (at {where})") for n in names]
