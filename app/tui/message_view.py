"""One message in the conversation: a role label over Markdown, which can grow while a reply streams."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, OptionList
from textual.widgets._markdown import MarkdownStream
from textual.widgets.option_list import Option

from ripelm.chat_store.records import CANCELLED, ERROR, PARTIAL
from ripelm.doc_qa import cited_numbers

_NOTES = {CANCELLED: "stopped", PARTIAL: "interrupted", ERROR: "failed"}


class MessageView(Vertical):
    def __init__(
        self,
        role: str,
        content: str,
        *,
        state: str = "done",
        message_id: int | None = None,
        sources: list[dict] | None = None,
    ):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.state = state
        self.message_id = message_id
        self.sources = sources or []
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role")
        yield Markdown(self.content)
        if self.sources and self.state != "streaming":
            yield self._source_list()

    def _source_list(self) -> OptionList:
        """The cited sources (all of them if none was cited); Enter on one shows its passage."""
        cited = set(cited_numbers(self.content))
        shown = [s for s in self.sources if s["number"] in cited] or self.sources
        return OptionList(
            *[Option(f"[{s['number']}] {s['where']}", id=str(s["number"])) for s in shown], classes="sources"
        )

    async def show_sources(self) -> None:
        if self.sources and not self.query(".sources"):
            await self.mount(self._source_list())

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        source = next(s for s in self.sources if str(s["number"]) == event.option.id)
        from ripelm.tui.dialogs import Passage

        self.app.push_screen(Passage(source))

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
