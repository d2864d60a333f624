"""The memory panel: every memory with the chat it comes from; `e` edits one, `d` deletes it, Enter opens
the message it was saved from (the chat is switched to and the message selected), Esc closes."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ripelm.chat_store import ChatStoreError
from ripelm.chat_store.records import Memory
from ripelm.tui.dialogs import TextPrompt

KEYS = "Enter: open where it was said · e: edit · d: delete · Esc: close"


def memory_text(store: Any, m: Memory) -> Text:
    text = Text(f"#{m.id} ", style="dim")
    text.append(m.content)
    source = "saved outside a chat"
    if m.chat_id is not None:
        try:
            source = f"from “{store.chat(m.chat_id).title}”"
        except ChatStoreError:
            source = "its chat was deleted"
    text.append(f"  · {source}", style="dim italic")
    return text


class MemoryPanel(ModalScreen[Memory | None]):
    AUTO_FOCUS = "#memory-list"
    BINDINGS = [
        Binding("escape", "dismiss_none", "Close"),
        Binding("e", "edit", "Edit"),
        Binding("d,delete", "delete", "Delete"),
    ]

    def __init__(self, store: Any):
        super().__init__()
        self.store = store
        self.memories: list[Memory] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog search"):
            yield Label("Memories", id="memory-title")
            yield OptionList(id="memory-list")
            yield Label(KEYS, classes="memory-keys")

    def on_mount(self) -> None:
        self.reload()

    def reload(self, keep: int | None = None) -> None:
        self.memories = self.store.memories()
        options = self.query_one("#memory-list", OptionList)
        options.clear_options()
        options.add_options([Option(memory_text(self.store, m), id=str(m.id)) for m in self.memories])
        title = f"Memories ({len(self.memories)})" if self.memories else "No memories yet: /remember TEXT"
        self.query_one("#memory-title", Label).update(title)
        if self.memories:
            options.highlighted = min(keep or 0, len(self.memories) - 1)

    def selected(self) -> Memory | None:
        at = self.query_one("#memory-list", OptionList).highlighted
        return self.memories[at] if at is not None and at < len(self.memories) else None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.memories[event.option_index])

    def action_edit(self) -> None:
        m = self.selected()
        if m is None:
            return
        at = self.memories.index(m)

        def done(text: str | None) -> None:
            if text is None:
                return
            try:
                self.store.edit_memory(m.id, text)
            except ChatStoreError as e:
                self.notify(str(e), severity="error")
                return
            self.reload(at)

        self.app.push_screen(TextPrompt(f"Edit memory #{m.id}", m.content), done)

    def action_delete(self) -> None:
        m = self.selected()
        if m is None:
            return
        at = self.memories.index(m)
        self.store.delete_memory(m.id)
        self.notify(f"forgot #{m.id}: {m.content}")
        self.reload(at)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
