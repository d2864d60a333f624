"""Messages the generation worker thread posts to the app (Textual's `post_message` is thread-safe)."""

from __future__ import annotations

from textual.message import Message

from ripelm.runtime.backend import GenerationStats

DELTA_INTERVAL_S = 0.1  # how often streamed text reaches the UI at most (10 updates a second)
DELTA_INTERVAL_MAX_S = 0.25  # ... and at least (4 a second; a streaming reply is also saved no less often)
UI_CPU_SHARE = 0.03  # the part of one core the UI may spend showing a streaming reply


def next_delta_interval(ui_cpu_s: float) -> float:
    """Seconds until the next streamed-text update, given the UI thread's CPU time since the last one.

    Showing an update (Markdown, layout, the screen's redraw) costs the UI thread 10-60 ms of CPU on a
    2-core Zen 3, and the engine's step runs on every core: at 10 updates a second the app decoded at
    ~0.75x of `ripe run`. Spacing the updates so the UI spends about UI_CPU_SHARE of a core keeps the
    engine near full speed; on a fast machine the updates stay at 10 a second.
    """
    return min(DELTA_INTERVAL_MAX_S, max(DELTA_INTERVAL_S, ui_cpu_s / UI_CPU_SHARE))


class ReplyDelta(Message):
    """New text of the streaming reply."""

    def __init__(self, generation_id: int, text: str, tokens: int, elapsed_s: float) -> None:
        super().__init__()
        self.generation_id = generation_id
        self.text = text
        self.tokens = tokens  # tokens generated so far
        self.elapsed_s = elapsed_s  # since the first token


class ReplySources(Message):
    """The passages a document Q&A reply is answered from (doc_qa.Source records as dicts)."""

    def __init__(self, generation_id: int, sources: list[dict]) -> None:
        super().__init__()
        self.generation_id = generation_id
        self.sources = sources


class ReplyDone(Message):
    def __init__(self, generation_id: int, stats: GenerationStats | None, error: str | None = None) -> None:
        super().__init__()
        self.generation_id = generation_id
        self.stats = stats
        self.error = error


class CancelAcknowledged(Message):
    """The engine stopped the reply after Esc: `latency_s` from the key to its acknowledgement, which came
    at `at` (time.perf_counter())."""

    def __init__(self, latency_s: float, at: float) -> None:
        super().__init__()
        self.latency_s = latency_s
        self.at = at


class BackendReady(Message):
    """A model finished loading (or failed to) on a worker thread."""

    def __init__(self, model: str | None, error: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.error = error
