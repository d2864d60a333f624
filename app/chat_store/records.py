"""The chat store's records: a chat (its settings) and a message (role, text, and how it ended)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How a stored message ended. An assistant reply is written as "partial" while it streams and becomes
# "done", "cancelled" (Esc: the text so far is kept) or "error" when it ends; a reply still "partial"
# after a restart was cut off by a crash or a kill.
DONE = "done"
PARTIAL = "partial"
CANCELLED = "cancelled"
ERROR = "error"
STATES = (DONE, PARTIAL, CANCELLED, ERROR)
MATCH_START, MATCH_END = "\x02", "\x03"  # around the matched words in a SearchHit's snippet


@dataclass
class Chat:
    id: int
    title: str
    model: str | None = None  # a model name or .gguf path; None: the default model
    draft: str | None = None  # draft model for speculative decoding; None: none
    system: str | None = None  # system prompt
    params: dict[str, Any] = field(default_factory=dict)  # sampling settings (SamplingParams field names)
    collection: str | None = None  # attached document collection for Q&A
    memory: bool = True  # memories are recalled into this chat and saved from it
    created: float = 0.0
    updated: float = 0.0


@dataclass
class Message:
    id: int
    chat_id: int
    role: str  # "user", "assistant" or "system"
    content: str
    state: str = DONE
    created: float = 0.0
    stats: dict[str, Any] | None = None  # generation numbers of an assistant reply
    sources: list[dict[str, Any]] | None = None  # cited passages of a document Q&A answer


@dataclass
class SearchHit:
    """A message found by `ChatStore.search`: where it is, and a snippet with the matches between
    MATCH_START and MATCH_END."""

    message_id: int
    chat_id: int
    chat_title: str
    role: str
    snippet: str


@dataclass
class Memory:
    """A fact or preference about the user, with where it was said: the chat and message (None once they
    are deleted, or when it was saved outside a stored chat)."""

    id: int
    content: str
    chat_id: int | None = None
    message_id: int | None = None
    created: float = 0.0
    updated: float = 0.0
    embedder: str | None = None  # fingerprint of the embedder that made `vector`
    vector: bytes | None = None  # float32, unit length
