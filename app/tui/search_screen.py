"""Search every message of every chat (the chat store's FTS5 index): results come as you type, each with
its chat, the matched words highlighted; Enter (on a result, or in the box: the highlighted one) opens the
chat at that message."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from ripelm.chat_store.records import MATCH_END, MATCH_START, SearchHit

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

    def __init__(self, store: Any):
        super().__init__()
        self.store = store
        self.hits: list[SearchHit] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog search"):
            yield Label("Search all messages")
            yield Input(placeholder="words (the last one may be a prefix)", id="search-input")
            yield OptionList(id="search-results")

    def on_input_changed(self, event: Input.Changed) -> None:
        self.hits = self.store.search(event.value)
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
