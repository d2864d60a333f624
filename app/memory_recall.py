"""Recalling memories into a prompt: the hybrid search of document Q&A over the stored memories, then as
many of the best as fit a token budget, put in front of the message being answered.

Why there and not in the system message: the earlier turns of the prompt stay exactly as they were, so
the engine's prefix cache still holds them (memories recalled into the system message change the first
tokens whenever the recalled set changes, and the whole chat is prefilled again). And the bundled 135M
model reads them better there: asked "What is my name?" with "The user's name is Sam." in the system
message it answered "I'm Sam." (taking the name as its own) for every wording tried (4 system prompts x
3 questions); with the same note in front of the question it answered "Sam, welcome ..." (2 of 3).

The same two signals and the same fusion as `ripe ask` (runtime/retrieval: FTS5 BM25 and the default
embedder's cosine, fused by `fusion.fuse`). Memories are few (tens, hundreds), so the dense side is an
exact scan of their stored vectors rather than the collection's vector file; a memory embedded by no or
another embedder is embedded on the way (and the vector stored). Only a memory BM25 matches (stop words
left out) or one with a cosine of at least DENSE_FLOOR is a candidate at all: an unrelated memory stays
out of the prompt. Without an embedder (the weights package missing) the BM25 side works alone.

The split follows the chat app's threads: `gather` and `store_vectors` touch the database (the UI
thread), `rank` embeds (a worker thread). `recall` does all of it in one thread (`ripe chat --plain`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import Memory

# Cosine (all-MiniLM-L6-v2) under which a memory BM25 did not match is left out. Measured on a few
# memories: related questions 0.24-0.37 ("which database should I use" / "uses Postgres": 0.31),
# unrelated ones under 0.13, a bare "Hello" 0.22 to the user's name (recalling it there does no harm).
DENSE_FLOOR = 0.2
# Words left out of the BM25 query: every memory says "The user ... is", so they would match them all.
STOPWORDS = frozenset(
    "a an the is are was were be been am i i'm me my mine you your we our it its this that these those of "
    "to in on at for with from by about as and or but not no do does did so if then than what which who "
    "whom whose when where why how can could should would will shall may might must have has had user "
    "user's s t".split()
)
HEADER = "What you know about the user from earlier conversations (use it when it is relevant):"


@dataclass
class Gathered:
    """What the database gives for one query: every memory, and the BM25 scores of those that match."""

    query: str
    memories: list[Memory]
    bm25: dict[int, float]


@dataclass
class Ranked:
    memories: list[Memory]  # candidates, best first
    vectors: list[tuple[int, str, bytes, str]] = field(default_factory=list)  # (id, embedder, vector, text)


def gather(store: ChatStore, query: str) -> Gathered:
    from ripelm.runtime.retrieval.search import fts_query

    words = [w for w in re.findall(r"\w+", query.lower()) if w not in STOPWORDS]
    return Gathered(query, store.memories(), store.memory_bm25(fts_query(" ".join(words))))


class MemoryEmbedder:
    """The default embedder, opened on first use (on the worker thread) and kept; None when it cannot be
    opened, with the reason in `error` (the BM25 side then works alone).

    The chat app shares it between memory recall and the message search (ripelm.message_search), from
    worker threads: a llama.cpp context is not thread-safe, so whoever embeds holds `busy` meanwhile."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.error: str | None = None if enabled else "off"
        self._embedder: Any = None
        self._lock = threading.Lock()
        self.busy = threading.Lock()

    def ready(self) -> Any:
        """The embedder if it can be had without converting the default one first (a conversion takes
        seconds: memory recall does it, a search does not wait for it); else None."""
        if self._embedder is None and self.error is None:
            from ripelm.models.bundled_embedder import converted_gguf_path

            if converted_gguf_path() is None:
                return None
        return self.get()

    def get(self) -> Any:
        with self._lock:
            if self._embedder is None and self.error is None:
                try:
                    from ripelm.retrieval_cli import _open_embedder

                    self._embedder = _open_embedder(None, workers=1)
                except Exception as e:  # no weights package, a broken file: memory still works by BM25
                    self.error = str(e) or type(e).__name__
            return self._embedder

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None


def rank(found: Gathered, embedder: Any) -> Ranked:
    """The candidate memories best first, and the vectors made on the way (to store)."""
    import numpy as np  # here, not at the top: the chat app imports this module before its first paint

    from ripelm.runtime.retrieval.fusion import FusionParams, fuse

    by_id = {m.id: m for m in found.memories}
    cosine: dict[int, float] = {}
    made: list[tuple[int, str, bytes, str]] = []
    if embedder is not None and found.memories:
        fp = embedder.info.fingerprint
        vecs: dict[int, np.ndarray] = {}
        for m in found.memories:
            if m.embedder == fp and m.vector is not None and len(m.vector) == 4 * embedder.dim:
                vecs[m.id] = np.frombuffer(m.vector, dtype=np.float32)
        missing = [m for m in found.memories if m.id not in vecs]
        if missing:
            new = embedder.embed([m.content for m in missing])
            for m, v in zip(missing, new, strict=True):
                vecs[m.id] = v
                made.append((m.id, fp, v.astype(np.float32).tobytes(), m.content))
        q = embedder.embed_query(found.query)
        cosine = {i: float(np.dot(v, q)) for i, v in vecs.items()}
    candidates = set(found.bm25) | {i for i, c in cosine.items() if c >= DENSE_FLOOR}
    dense = {i: cosine[i] for i in candidates if i in cosine}
    bm25 = {i: s for i, s in found.bm25.items() if i in by_id}
    order = [i for i, _ in fuse(dense, bm25, FusionParams()) if i in by_id]
    return Ranked([by_id[i] for i in order], made)


def store_vectors(store: ChatStore, ranked: Ranked) -> None:
    for mem_id, fp, vector, content in ranked.vectors:
        store.set_memory_vector(mem_id, fp, vector, content)


def memory_block(memories: list[Memory]) -> str:
    return "\n".join([HEADER, *(f"- {m.content}" for m in memories)])


def fit_budget(memories: list[Memory], count_tokens: Callable[[str], int], budget: int) -> list[Memory]:
    """The best memories whose block stays within `budget` tokens (a memory that does not fit is skipped
    and a shorter one after it may still go in)."""
    kept: list[Memory] = []
    for m in memories:
        if count_tokens(memory_block([*kept, m])) <= budget:
            kept.append(m)
    return kept


def with_memories(turns: list[dict[str, str]], memories: list[Memory]) -> list[dict[str, str]]:
    """The conversation with the memories in front of its last user message (the earlier turns as they
    were); with no user message, in a system message of their own."""
    if not memories:
        return turns
    block = memory_block(memories)
    last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last is None:
        return [{"role": "system", "content": block}, *turns]
    out = list(turns)
    out[last] = {**turns[last], "content": f"{block}\n\n{turns[last]['content']}"}
    return out


def token_counter(backend: Any) -> Callable[[str], int]:
    """Tokens of a text in the backend's tokenizer; a server engine has none here: about 4 characters a
    token (English), rounded up."""
    if backend.caps.takes_messages:
        return lambda text: -(-len(text) // 4)
    return lambda text: len(backend.tokenizer.encode(text, add_bos=False))


def recall(
    store: ChatStore, query: str, embedder: Any, count_tokens: Callable[[str], int], budget: int
) -> list[Memory]:
    """The memories for `query` within `budget` tokens, all in this thread (vectors made are stored)."""
    ranked = rank(gather(store, query), embedder)
    store_vectors(store, ranked)
    return fit_budget(ranked.memories, count_tokens, budget)
