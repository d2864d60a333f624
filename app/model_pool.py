"""The models a `ripe serve` holds: loaded on demand by name, unloaded after an idle keep-alive, within a
memory budget (Ollama's scheduling, as its API exposes it through `keep_alive` and /api/ps).

Each loaded model counts the requests using it; when the last one ends, its expiry is set from the
request's `keep_alive` (seconds; None = never; 0 = now) or the model's own policy (the server's
`--keep-alive` for models loaded on demand; the model named at start stays loaded until told otherwise).
A reaper thread unloads expired idle models. A model's size is its file plus the K/V cache its engine
reserves. Before a load, idle models are unloaded oldest first (those kept for ever last) until the new
model's file fits in the budget, and after it, until the file and its K/V cache fit; if busy models leave
no room, the request is refused (503). Loads run one at a time, so two requests for a cold model load it once.

`PooledBackend` is the model named at start seen as one `Backend` (what the OpenAI routes serve): it
loads the model again if it was unloaded and holds it while a generation runs.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ripelm.errors import PoolFullError
from ripelm.models.errors import RipelmError
from ripelm.runtime.backend import Backend, GenerationStats
from ripelm.runtime.sampling import SamplingParams

UNSET: Any = object()


@dataclass
class Loaded:
    name: str
    path: Path | None
    backend: Backend
    size: int
    keep: float | None  # seconds to stay loaded once idle; None = until unloaded
    pinned: bool = False  # a backend given to the server (tests, embedding): never unloaded
    refs: int = 0
    expires: float | None = None  # time.monotonic() deadline while idle
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock | None = None  # one request at a time for backends that cannot batch

    def expires_at(self) -> float | None:
        """Wall-clock expiry (for /api/ps), None = never; while busy, the keep-alive from now."""
        if self.pinned or self.keep is None:
            return None
        if self.refs or self.expires is None:
            return time.time() + self.keep
        return time.time() + max(0.0, self.expires - time.monotonic())


class ModelPool:
    def __init__(
        self,
        opener: Callable[[Path], Backend] | None,
        *,
        resolve: Callable[[str], tuple[str, Path]] | None = None,
        budget: int | None = None,
        default_keep_alive: float | None = 300.0,
        reap_every: float = 0.25,
    ):
        self.opener, self.resolver = opener, resolve
        self.budget, self.default_keep_alive = budget, default_keep_alive
        self.models: dict[str, Loaded] = {}
        self.apis: dict[str, Any] = {}  # the OpenAI routes' Api per model (see api_for)
        self._cv = threading.Condition()
        self._load_lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap, args=(reap_every,), name="ripe-reaper", daemon=True
        )
        self._reaper.start()

    @classmethod
    def fixed(cls, backend: Backend, name: str, path: Path | None) -> ModelPool:
        pool = cls(None)
        size = (path.stat().st_size if path else 0) + int(getattr(backend, "kv_bytes", 0))
        pool._add(Loaded(name, path, backend, size, None, pinned=True))
        return pool

    def _add(self, m: Loaded) -> None:
        m.lock = None if m.backend.caps.batched else threading.Lock()
        with self._cv:
            self.models[m.name] = m

    # ---- names -----------------------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[str, Path | None]:
        from ripelm.models.store import _canonical
        from ripelm.ollama_models import NotFound

        with self._cv:
            for m in self.models.values():
                if name == m.name or _canonical(name) == _canonical(m.name):
                    return m.name, m.path
        if self.resolver is None:
            served = ", ".join(self.models) or "none"
            raise NotFound(f'model "{name}" not found (this server runs {served})')
        return self.resolver(name)

    # ---- loading and unloading -------------------------------------------------------------------

    def load(self, name: str, keep_alive: Any = UNSET) -> Loaded:
        """The loaded model (loading it first if needed); `keep_alive` given: that policy from now on."""
        canonical, path = self.resolve(name)
        with self._load_lock:
            with self._cv:
                m = self.models.get(canonical)
            if m is None:
                assert self.opener is not None and path is not None
                self._make_room(path.stat().st_size, canonical)
                backend = self.opener(path)
                # what it holds: the weights and the K/V cache it reserved (Ollama's /api/ps counts both)
                size = path.stat().st_size + int(getattr(backend, "kv_bytes", 0))
                try:
                    self._make_room(size, canonical)
                except PoolFullError:
                    backend.close()
                    raise
                keep = self.default_keep_alive if keep_alive is UNSET else keep_alive
                m = Loaded(canonical, path, backend, size, keep)
                self._add(m)
        if keep_alive is not UNSET and not m.pinned:
            m.keep = keep_alive
        return m

    def _make_room(self, need: int, name: str) -> None:
        if self.budget is None:
            return
        while True:
            with self._cv:
                used = sum(m.size for m in self.models.values())
                if used + need <= self.budget:
                    return
                idle = [m for m in self.models.values() if m.refs == 0 and not m.pinned]
                if not idle:
                    raise PoolFullError(
                        f"not enough memory to load {name}: the budget is {self.budget >> 20} MiB and "
                        f"{used >> 20} MiB are held by models in use; try again when they are idle"
                    )
                victim = min(idle, key=lambda m: (m.keep is None, m.last_used))  # kept-for-ever ones last
            self.unload(victim.name)

    @contextmanager
    def use(self, name: str, keep_alive: Any = UNSET) -> Iterator[Loaded]:
        """Hold a model for one request; when released idle, its keep-alive starts."""
        while True:
            m = self.load(name, keep_alive)
            with self._cv:
                if self.models.get(m.name) is m:  # not unloaded between load and here
                    m.refs += 1
                    m.expires = None
                    break
        try:
            yield m
        finally:
            with self._cv:
                m.refs -= 1
                m.last_used = time.monotonic()
                if m.refs == 0 and m.keep is not None and not m.pinned:
                    m.expires = m.last_used + m.keep
                self._cv.notify_all()

    def unload(self, name: str) -> bool:
        """Unload now if idle, else as soon as its requests end. False if it was not loaded."""
        try:
            canonical, _ = self.resolve(name)
        except RipelmError:
            return False
        with self._cv:
            m = self.models.get(canonical)
            if m is None or m.pinned:
                return False
            if m.refs:
                m.keep, m.expires = 0.0, None  # the last request's release sets expires = now
                return True
            del self.models[canonical]
        m.backend.close()
        gc.collect()  # the weights and KV pool go back to the system now, not at some later collection
        return True

    def _reap(self, every: float) -> None:
        while not self._closed.wait(every):
            now = time.monotonic()
            with self._cv:
                due = [
                    n
                    for n, m in self.models.items()
                    if not m.refs and m.expires is not None and m.expires <= now
                ]
            for n in due:
                self.unload(n)

    def loaded(self) -> list[Loaded]:
        with self._cv:
            return sorted(self.models.values(), key=lambda m: m.name)

    def close(self) -> None:
        self._closed.set()
        with self._cv:
            models, self.models = list(self.models.values()), {}
        for m in models:
            if not m.pinned:  # a backend given to the server is closed by whoever opened it
                m.backend.close()


class PooledBackend:
    """A pool's model as a `Backend`: loaded again on use after an unload, held while generating."""

    def __init__(self, pool: ModelPool, model: str):
        self.pool, self.model = pool, model

    def _b(self) -> Backend:
        return self.pool.load(self.model).backend

    def __getattr__(self, attr: str) -> Any:  # name, tokenizer, template, context_length, device, engine
        if attr in ("pool", "model"):
            raise AttributeError(attr)
        return getattr(self._b(), attr)

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        with self.pool.use(self.model) as m:
            yield from m.backend.generate_ids(prompt, params, stats)

    def close(self) -> None:
        self.pool.close()


def api_for(api: Any, name: Any) -> Any:
    """The OpenAI routes' `Api` for the model a request names: another model of the store is served through
    the pool (loaded on demand, with the default keep-alive); no name, the served model's name, or a name
    the store does not know (clients that send "gpt-4o") keep the model the server was started with."""
    from ripelm.server import Api

    pool: ModelPool | None = getattr(api, "pool", None)
    if pool is None or not isinstance(name, str) or not name or name == api.model_name:
        return api
    try:
        canonical, path = pool.resolve(name)
    except RipelmError:
        return api
    if canonical == api.model_name:
        return api
    with pool._cv:
        cached = pool.apis.get(canonical)
    if cached is None:
        cached = Api(PooledBackend(pool, canonical), canonical, api.embeddings, path)
        cached.pool = pool  # type: ignore[attr-defined]
        with pool._cv:
            pool.apis[canonical] = cached
    return cached
