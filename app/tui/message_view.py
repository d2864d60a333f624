"""One message in the conversation: a role label over Markdown, which can grow while a reply streams."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown
from textual.widgets._markdown import MarkdownStream

from ripelm.chat_store.records import CANCELLED, ERROR, PARTIAL

_NOTES = {CANCELLED: "stopped", PARTIAL: "interrupted", ERROR: "failed"}


class MessageView(Vertical):
    def __init__(self, role: str, content: str, *, state: str = "done", message_id: int | None = None):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.state = state
        self.message_id = message_id
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role")
        yield Markdown(self.content)

    def _label(self) -> str:
        name = {"user": "You", "assistant": "Assistant", "system": "System", "note": "·"}.get(
            self.role, self.role
        )
        note = _NOTES.get(self.state)
        return f"{name} ({note})" if note and self.role == "assistant" else name

    def set_state(self, state: str) -> None:
        self.state = state
        self.query_one(".role", Label).update(self._label())

    async def append(self, text: str) -> None:
        """Add streamed text; Markdown re-renders incrementally (fragments coalesce when it falls behind)."""
        self.content += text
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        await self._stream.write(text)

    async def end_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
