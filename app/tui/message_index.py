"""The chat app's background embedding of messages for the hybrid search (ripelm.message_search).

A mixin of `RipeApp` (app.py). A pass embeds every message that has no vector yet (new, edited, or from
before schema v7), newest first, in a thread worker: shortly after start, after each reply, and when the
search opens. It runs only while the engine is idle: it does not start while a reply streams and stops
before its next batch when one starts, so it never takes a core (or the GIL) from a decode. Within a batch
llama.cpp computes with the GIL released, and the store's reads and writes run on the UI thread (where
the connection lives) between batches, each a few milliseconds, so typing is never blocked.

It uses the app's shared embedder (`memory_embedder`) only once the default embedder is converted: the
chat app never spends seconds converting it for search (memory recall or `ripe index` does). Without it,
or with `[chat] dense_search = false`, nothing is embedded and the search is FTS5 alone.
"""

from __future__ import annotations

from typing import Any

from textual import work
from textual.worker import get_current_worker

from ripelm.message_search import embed_pending
from ripelm.tui.messages import ReplyDone
from ripelm.tui.search_screen import MessageSearch

FIRST_PASS_DELAY_S = 3.0  # after start: the model loads first (torch's import holds the GIL)


class MessageIndex:
    memory_embedder: Any
    store: Any
    reply: Any
    screen: Any

    def setup_message_index(self, dense_search: bool) -> None:
        self.dense_search = dense_search  # [chat] dense_search in config.toml
        self.message_vectors_made = 0  # vectors stored by the background passes (the tests read it)
        self._indexing = False

    def search_embedders(self) -> Any:
        """What the message search embeds its queries with; None: FTS5 alone."""
        return self.memory_embedder if self.dense_search else None

    def on_mount(self) -> None:
        self.set_timer(FIRST_PASS_DELAY_S, self.index_messages)

    def on_reply_done(self, event: ReplyDone) -> None:  # after RipeApp's own handler (Textual calls both)
        self.index_messages()

    def index_messages(self) -> None:
        """Start a background pass unless one is running, a reply streams, or dense search is off."""
        if self.dense_search and not self._indexing and self.reply is None:
            self._indexing = True
            self._index_pass()

    def _vectors_made(self) -> None:
        if isinstance(self.screen, MessageSearch):  # open: it searches the new vectors too
            self.screen.vectors_changed()

    @work(thread=True, exit_on_error=False, group="message-index")
    def _index_pass(self) -> None:
        worker = get_current_worker()
        try:
            embedder = self.memory_embedder.ready()
            if embedder is None:
                return
            made = embed_pending(
                self.call_from_thread,
                self.store,
                embedder,
                self.memory_embedder.busy,
                lambda: worker.is_cancelled or self.reply is not None,
            )
            self.message_vectors_made += made
            if made:
                self.call_from_thread(self._vectors_made)
        finally:
            self._indexing = False
