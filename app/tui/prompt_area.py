"""The chat app's message box: Textual's TextArea, several lines high, where one key sends and another
starts a new line.

By default Enter sends and Shift+Enter or Ctrl+J start a new line; with `enter_sends = false` under
`[chat]` in config.toml it is the other way round (Enter: new line; Ctrl+J or Shift+Enter: send). Most
terminals send Shift+Enter as plain Enter (only those with the kitty keyboard protocol tell them apart),
so Ctrl+J is the key that works everywhere. A paste (bracketed paste) is inserted as it is, newlines
included, and never sends.
"""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

SEND_OTHER = ("ctrl+j", "shift+enter")  # the keys that do what Enter does not


def prompt_placeholder(enter_sends: bool) -> str:
    """The message box's placeholder: which key sends and which starts a new line."""
    keys = "Enter sends · Ctrl+J newline" if enter_sends else "Ctrl+J sends · Enter newline"
    return f"Message · {keys} · Esc stops"


class PromptArea(TextArea):
    class Submitted(Message):
        """The user sent the text of the box (Enter, or Ctrl+J with `enter_sends = false`)."""

        def __init__(self, area: PromptArea, value: str) -> None:
            super().__init__()
            self.area = area
            self.value = value

        @property
        def control(self) -> PromptArea:
            return self.area

    def __init__(self, *, enter_sends: bool = True, placeholder: str = "", id: str | None = None):
        super().__init__(
            id=id, placeholder=placeholder, soft_wrap=True, show_line_numbers=False, compact=True,
            highlight_cursor_line=False, tab_behavior="focus",
        )  # fmt: skip
        self.enter_sends = enter_sends

    @property
    def value(self) -> str:
        """The text in the box (as Input calls it)."""
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        sends = event.key == "enter" if self.enter_sends else event.key in SEND_OTHER
        newline = event.key in SEND_OTHER if self.enter_sends else event.key == "enter"
        if sends:
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
        elif newline:
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
        else:
            await super()._on_key(event)
