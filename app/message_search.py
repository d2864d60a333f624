"""The hybrid search over all messages of all chats: FTS5's BM25 (the chat store's index) fused with the
cosine of each message's embedding to the query, by the retrieval stack's fusion (`fusion.fuse`, the same
as `ripe ask` and memory recall), so a query finds a message that says the same thing in other words.

Message vectors are made in the background by the chat app (`embed_pending`, driven by
ripelm.tui.message_index) with the default embedder, once it is converted (the chat app never converts
it for search; `ripe index` or memory recall does), and stored with their message (chat store schema v7).
A message is embedded as a whole, cut to the embedder's window (about 256 tokens): a long reply is found
by its beginning. The dense side is an exact scan of a matrix of all vectors, read once when the search
opens: a chat history is thousands of messages (384 floats each: 1.5 MB per thousand), which a matrix
product scans in well under a millisecond, so no approximate index is needed.

Only a message BM25 matches or one whose cosine reaches DENSE_FLOOR is a candidate: without the floor
every query would list every message. Without an embedder (not converted yet, `[chat] dense_search =
false`) the search is FTS5 alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ripelm.chat_store.records import SearchHit

if TYPE_CHECKING:  # numpy is imported where used: the chat app imports this module before its first paint
    import numpy as np

# Cosine (all-MiniLM-L6-v2) a message BM25 did not match needs to be listed. Measured on 8 short messages
# and 5 queries sharing no word with them: the message meant 0.33-0.69 ("Japanese shrines with red
# foliage" / "Kyoto is lovely then: maples and temples.": 0.41), one loose match at 0.19 ("baking bread
# with wild yeast" / a sourdough starter), the unrelated ones -0.13-0.24 (mostly under 0.1).
DENSE_FLOOR = 0.25
MAX_DENSE_ONLY = 20  # hits found by meaning alone listed at most
EMBED_BATCH = 8  # messages per embedding call: short calls, so a reply starting waits little for the lock


class DenseMessages:
    """The stored message vectors of one embedder as a matrix, for the cosine of a query to every one."""

    def __init__(self, store: Any, embedder: Any):
        import numpy as np

        self.embedder = embedder
        self.dim = embedder.dim
        rows = [(i, v) for i, v in store.message_vectors(embedder.info.fingerprint) if len(v) == 4 * self.dim]
        self.ids = np.array([i for i, _ in rows], dtype=np.int64)
        self.matrix = (
            np.frombuffer(b"".join(v for _, v in rows), dtype=np.float32).reshape(len(rows), self.dim)
            if rows
            else np.zeros((0, self.dim), dtype=np.float32)
        )

    def __len__(self) -> int:
        return len(self.ids)

    def cosines(self, query_vector: np.ndarray, top: int = 200) -> dict[int, float]:
        """Message id -> cosine for the `top` closest messages."""
        import numpy as np

        if not len(self.ids):
            return {}
        sims = self.matrix @ query_vector.astype(np.float32)
        order = np.argsort(-sims)[:top]
        return {int(self.ids[i]): float(sims[i]) for i in order}


def hybrid_hits(store: Any, text: str, cosine: dict[int, float], limit: int = 50) -> list[SearchHit]:
    """The hits for `text`, best first: BM25 fused with the dense `cosine` (message id -> cosine of its
    vector to the query; empty: FTS5 alone, in its own order)."""
    from ripelm.runtime.retrieval.fusion import FusionParams, fuse

    fts = {h.message_id: h for h in store.search(text, limit)}
    if not cosine:
        return list(fts.values())
    bm25 = {i: s for i, s in store.search_bm25(text, limit).items() if i in fts}
    close = sorted((-c, i) for i, c in cosine.items() if c >= DENSE_FLOOR and i not in fts)  # closest first
    candidates = set(fts) | {i for _, i in close[:MAX_DENSE_ONLY]}
    dense = {i: cosine[i] for i in candidates if i in cosine}
    order = [i for i, _ in fuse(dense, bm25, FusionParams())]
    found = {**store.hits_for([i for i in order if i not in fts]), **fts}
    return [found[i] for i in order if i in found][:limit]


def embed_pending(
    store_call: Any, store: Any, embedder: Any, busy: Any, should_stop: Any, batch: int = EMBED_BATCH
) -> int:
    """Embed the messages that have no vector yet, a batch at a time, until none is left or `should_stop()`
    (checked before each batch: a reply started). `store_call(fn, *args)` runs a store method where the
    store's connection lives (the chat app's UI thread); the embedding runs here, holding `busy`
    (llama.cpp releases the GIL while it computes). Returns how many vectors were stored."""
    import numpy as np

    fp = embedder.info.fingerprint
    stored = 0
    below = None  # newest first, each batch below the last (a message edited meanwhile: the next pass)
    while not should_stop():
        todo = store_call(store.messages_to_embed, fp, batch, below)
        if not todo:
            break
        below = min(i for i, _ in todo)
        with busy:
            vectors = embedder.embed([text for _, text in todo])
        made = [(i, text, v.astype(np.float32).tobytes()) for (i, text), v in zip(todo, vectors, strict=True)]
        stored += store_call(store.set_message_vectors, fp, made)
    return stored
