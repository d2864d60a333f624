"""Messages the generation worker thread posts to the app (Textual's `post_message` is thread-safe)."""

from __future__ import annotations

from textual.message import Message

from ripelm.runtime.backend import GenerationStats


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


class BackendReady(Message):
    """A model finished loading (or failed to) on a worker thread."""

    def __init__(self, model: str | None, error: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.error = error
