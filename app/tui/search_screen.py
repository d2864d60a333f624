"""Search every message of every chat (the chat store's FTS5 index): results come as you type, each with
its chat, the matched words highlighted; Enter (on a result, or in the box: the highlighted one) opens the
chat at that message.

With an embedder (`embedders`: the app's shared one, when it is converted and dense search is on) the
results are hybrid (ripelm.message_search): the FTS5 hits show at once, and the fused ones replace them
when the query is embedded, in a thread worker, so typing never waits for it; a message that shares no
word with the query but means the same is found too."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from ripelm.chat_store.records import MATCH_END, MATCH_START, SearchHit
from ripelm.message_search import DenseMessages, hybrid_hits

_WHO = {"user": "You", "assistant": "Assistant"}


def hit_text(hit: SearchHit) -> Text:
    """`chat title · who: snippet`, the matched words in bold."""
    text = Text()
    text.append(hit.chat_title, style="bold")
    text.append(f" · {_WHO.get(hit.role, hit.role)}: ", style="dim")
    for i, part in enumerate(hit.snippet.split(MATCH_START)):
        matched, _, rest = part.partition(MATCH_END) if i else ("", "", part)
        text.append(matched, style="bold reverse")
        text.append(rest)
    return text


class MessageSearch(ModalScreen[SearchHit | None]):
    AUTO_FOCUS = "#search-input"
    BINDINGS = [
        Binding("escape", "dismiss_none", "Close"),
        Binding("down", "results", "Results", show=False),
    ]

    def __init__(self, store: Any, embedders: Any = None):
        super().__init__()
        self.store = store
        self.embedders = embedders  # MemoryEmbedder (ready(), busy) or None: FTS5 alone
        self.dense: DenseMessages | None = None
        self.hits: list[SearchHit] = []
        self.dense_queries = 0  # queries answered with the dense side (the tests read it)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog search"):
            yield Label("Search all messages")
            yield Input(placeholder="words (the last one may be a prefix)", id="search-input")
            yield OptionList(id="search-results")

    def on_mount(self) -> None:
        if self.embedders is not None:
            self._open_dense()

    @work(thread=True, exit_on_error=False, group="dense-open")
    def _open_dense(self) -> None:
        embedder = self.embedders.ready()  # loading the model file: off the UI thread
        if embedder is not None:
            self.app.call_from_thread(self._dense_ready, embedder)

    def _dense_ready(self, embedder: Any) -> None:
        if not self.is_attached:
            return  # closed meanwhile
        self.dense = DenseMessages(self.store, embedder)  # the vectors are read where the store lives
        text = self.query_one("#search-input", Input).value
        if text.strip() and len(self.dense):
            self._embed_query(text)

    def vectors_changed(self) -> None:
        """Messages were embedded while the search is open (the app's background pass): read them."""
        if self.embedders is not None and self.dense is not None:
            self._dense_ready(self.dense.embedder)
        elif self.embedders is not None:
            self._open_dense()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._show(self.store.search(event.value))
        if self.dense is not None and len(self.dense) and event.value.strip():
            self._embed_query(event.value)

    @work(thread=True, exclusive=True, exit_on_error=False, group="dense-query")
    def _embed_query(self, text: str) -> None:
        dense = self.dense
        with self.embedders.busy:
            vector = dense.embedder.embed_query(text)
        self.app.call_from_thread(self._show_hybrid, text, dense.cosines(vector))

    def _show_hybrid(self, text: str, cosine: dict[int, float]) -> None:
        if not self.is_attached or text != self.query_one("#search-input", Input).value:
            return  # typed on meanwhile: a newer query is on its way
        self.dense_queries += 1
        self._show(hybrid_hits(self.store, text, cosine))

    def _show(self, hits: list[SearchHit]) -> None:
        self.hits = hits
        results = self.query_one("#search-results", OptionList)
        results.clear_options()
        results.add_options([Option(hit_text(h), id=str(h.message_id)) for h in self.hits])
        if self.hits:
            results.highlighted = 0

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        at = self.query_one("#search-results", OptionList).highlighted
        if self.hits:
            self.dismiss(self.hits[at or 0])

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.hits[event.option_index])

    def action_results(self) -> None:
        self.query_one("#search-results", OptionList).focus()

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
