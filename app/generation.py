"""One streaming reply that another thread can cancel, over any `Backend`.

`Generation.events()` runs the shared `stream()` pipeline (call it on a worker thread). `cancel()` may be
called from any thread (the UI's): on the native engine it cancels the engine request directly, so the
engine drops the sequence at its next step boundary, and returns the engine's acknowledgement event
(set once the request's KV blocks are freed). Other engines stop at the next token; their
acknowledgement is set when the stream has ended.

`RemoteGeneration` is the same for a server engine (`takes_messages`, `--engine openai`): it sends the
chat messages and the server renders the template. The stream is read on a thread of its own, so a
cancel ends the reply at once even while the server is silent (a long prefill, a stalled server); the
connection is dropped at the server's next chunk, which stops its work. The conversation is fitted to the
server's context window first (`remote_fit`); `on_trim(dropped)` hears when old turns were left out.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ripelm.remote_fit import remote_reply
from ripelm.runtime.backend import GenerationStats, TokenEvent, stream
from ripelm.runtime.sampling import SamplingParams


class _Tracked:
    """The backend as `stream()` sees it, keeping hold of the engine request it submits."""

    def __init__(self, backend: Any, generation: Generation):
        self._backend = backend
        self._gen = generation
        self.name = backend.name
        self.caps = backend.caps
        self.tokenizer = backend.tokenizer
        self.template = backend.template
        self.context_length = backend.context_length
        self.device = backend.device

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        if not self._backend.caps.cancel:
            yield from self._backend.generate_ids(prompt, params, stats)
            return
        req = self._backend.submit(prompt, params)
        with self._gen._lock:
            self._gen._request = req
            cancelled = self._gen.cancel_requested.is_set()
        if cancelled:
            req.cancel()
        yield from self._backend.request_ids(req, stats)

    def close(self) -> None:
        pass


class Generation:
    def __init__(self, backend: Any, prompt: list[int], params: SamplingParams):
        self.backend = backend
        self.prompt = prompt
        self.params = params
        self.cancel_requested = threading.Event()
        self.ended = threading.Event()  # the stream loop has returned (on any engine)
        self.stats: GenerationStats | None = None
        self._request: Any = None
        self._lock = threading.Lock()

    def events(self) -> Iterator[TokenEvent]:
        """Text events; the last has done=True and the stats (finish_reason "cancelled" after `cancel`)."""
        try:
            for ev in stream(_Tracked(self.backend, self), self.prompt, self.params, self.cancel_requested):
                if ev.done and ev.stats is not None:
                    if self.cancel_requested.is_set():
                        ev.stats.finish_reason = "cancelled"
                    self.stats = ev.stats
                yield ev
        finally:
            self.ended.set()

    def cancel(self) -> threading.Event:
        """Stop generating now; returns the event that acknowledges it (see the module docstring)."""
        with self._lock:
            self.cancel_requested.set()
            req = self._request
        if req is not None:
            return req.cancel()
        return self.ended


class RemoteGeneration:
    """A reply from an OpenAI-compatible server: `events()`, `cancel()` and `stats` as in `Generation`."""

    def __init__(
        self,
        backend: Any,
        messages: list[dict[str, str]],
        params: SamplingParams,
        on_trim: Callable[[int], None] | None = None,
    ):
        self.backend = backend
        self.messages = messages
        self.params = params
        self.on_trim = on_trim
        self.cancel_requested = threading.Event()
        self.ended = threading.Event()  # `events()` has returned
        self.stats: GenerationStats | None = None
        self._queue: queue.SimpleQueue[TokenEvent | BaseException | None] = queue.SimpleQueue()

    def _read(self) -> None:
        try:
            events = remote_reply(
                self.backend, self.messages, self.params, self.cancel_requested, self.on_trim
            )
            for ev in events:
                self._queue.put(ev)
        except BaseException as e:  # handed to the reader, which raises it
            self._queue.put(e)

    def events(self) -> Iterator[TokenEvent]:
        threading.Thread(target=self._read, name="ripelm-remote-stream", daemon=True).start()
        t0 = time.perf_counter()
        t_first: float | None = None
        pieces = 0
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:  # cancelled: end with what came (the reader drops the connection later)
                    stats = GenerationStats(
                        engine=self.backend.name,
                        generated_tokens=pieces,  # chunks: the server's token count comes at the end
                        ttft_s=(t_first - t0) if t_first is not None else 0.0,
                        total_s=time.perf_counter() - t0,
                    )
                    item = TokenEvent("", done=True, stats=stats)
                elif item.text:
                    pieces += 1
                    t_first = t_first if t_first is not None else time.perf_counter()
                if item.done and item.stats is not None:
                    if self.cancel_requested.is_set():
                        item.stats.finish_reason = "cancelled"
                    self.stats = item.stats
                yield item
                if item.done:
                    return
        finally:
            self.ended.set()

    def cancel(self) -> threading.Event:
        """Stop now; the returned event is set once the reply has ended (what came before is kept)."""
        self.cancel_requested.set()
        self._queue.put(None)
        return self.ended
