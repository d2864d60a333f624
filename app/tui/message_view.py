"""One message in the conversation: a role label over Markdown, which can grow while a reply streams.

A message can be selected (Ctrl+Up from the message box, a click, then Up/Down to move): `c` copies it,
`1` … `9` copy its first … ninth code block (OSC 52, through Textual's `copy_to_clipboard`); `e` edits a
message you sent and `r` regenerates a reply, each kept as a new version beside the old; `<` `>` switch
between a message's versions (the label shows `‹ 2/3 ›`).

A reply that opens with `<think>` (reasoning models: Qwen3, DeepSeek-R1 …) shows its reasoning in a
collapsed "thinking" block (Textual's Collapsible) above the answer, while it streams too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Collapsible, Label, OptionList, Static
from textual.widgets.option_list import Option

from ripelm.chat_export import code_blocks
from ripelm.chat_store.records import CANCELLED, ERROR, PARTIAL
from ripelm.doc_qa import cited_numbers

if TYPE_CHECKING:
    from textual.widgets._markdown import MarkdownStream

_NOTES = {CANCELLED: "stopped", PARTIAL: "interrupted", ERROR: "failed"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def hard_breaks(text: str) -> str:
    """A message you typed as Markdown that keeps its line breaks (each line ends in a hard break, code
    blocks as they are): Markdown would join the lines of a multi-line message into one paragraph."""
    lines, fenced = text.split("\n"), False
    out = []
    for i, line in enumerate(lines):
        fence = line.lstrip().startswith(("```", "~~~"))
        fenced = fenced != fence
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        breaks = not fenced and not fence and line.strip() and nxt.strip()
        out.append(line + "\\" if breaks and not nxt.lstrip().startswith(("```", "~~~")) else line)
    return "\n".join(out)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply: the reasoning is what a leading `<think>` opens, up to `</think>`
    (all the rest while it is still open); None without one. A reply that so far is only the start of
    `<think>` shows nothing yet (the tag may still be coming)."""
    head = text.lstrip()
    if not head.startswith(THINK_OPEN):
        return (None, "") if head and THINK_OPEN.startswith(head) else (None, text)
    body = head[len(THINK_OPEN) :]
    end = body.find(THINK_CLOSE)
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), body[end + len(THINK_CLOSE) :].lstrip()


class MessageView(Vertical, can_focus=True):
    BINDINGS = [
        Binding("c", "copy_message", "Copy message"),
        Binding("less_than_sign,left", "version(-1)", "Previous version"),
        Binding("greater_than_sign,right", "version(1)", "Next version"),
        Binding("e", "edit", "Edit"),
        Binding("r", "regenerate", "Regenerate"),
        Binding("up", "select(-1)", "Previous", show=False),
        Binding("down", "select(1)", "Next", show=False),
        *[Binding(str(n), f"copy_block({n})", f"Copy code block {n}", show=False) for n in range(1, 10)],
    ]

    def __init__(
        self,
        role: str,
        content: str,
        *,
        state: str = "done",
        message_id: int | None = None,
        sources: list[dict] | None = None,
        versions: list[int] | None = None,
    ):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.state = state
        self.message_id = message_id
        self.sources = sources or []
        self.versions = versions or []  # the ids of this message's versions, when it has more than one
        self._stream: MarkdownStream | None = None
        thinking, self._answer = split_thinking(content) if role == "assistant" else (None, content)
        self._shown = hard_breaks(content) if role == "user" else self._answer
        self._thinking = thinking

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role")
        if self._thinking is not None:
            yield self._thinking_block()
        # Markdown (markdown-it, pygments: ~60 ms) is imported with the first message, not before the app's
        # first paint
        from textual.widgets import Markdown

        yield Markdown(self._shown, classes="answer")
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
        label = f"{name} ({note})" if note and self.role == "assistant" else name
        if self.message_id in self.versions:
            label += f"  ‹ {self.versions.index(self.message_id) + 1}/{len(self.versions)} ›"
        return label

    def set_state(self, state: str) -> None:
        self.state = state
        self.query_one(".role", Label).update(self._label())

    def _thinking_block(self) -> Collapsible:
        return Collapsible(
            Static(self._thinking or "", classes="thinking-text", markup=False),
            title="thinking",
            collapsed=True,
            classes="thinking",
        )

    def action_copy_message(self) -> None:
        self.app.copy_to_clipboard(self.answer)
        self.app.notify("copied the message")

    def action_copy_block(self, n: int) -> None:
        blocks = code_blocks(self.answer)
        if n > len(blocks):
            self.app.notify(f"this message has {len(blocks) or 'no'} code block{'s' * (len(blocks) != 1)}")
            return
        self.app.copy_to_clipboard(blocks[n - 1])
        self.app.notify(f"copied code block {n} of {len(blocks)}")

    async def action_version(self, step: int) -> None:
        if self.message_id is not None:
            await self.app.switch_version(self.message_id, step)  # type: ignore[attr-defined]

    def action_edit(self) -> None:
        if self.message_id is not None:
            self.app.edit_message(self.message_id)  # type: ignore[attr-defined]

    async def action_regenerate(self) -> None:
        if self.message_id is not None:
            await self.app.regenerate_message(self.message_id)  # type: ignore[attr-defined]

    def action_select(self, step: int) -> None:
        """Up/Down: the previous or next message; past the last one, back to the message box."""
        views = list(self.app.query(MessageView))
        i = views.index(self) + step
        if i >= len(views):
            self.app.query_one("#prompt").focus()
        elif i >= 0:
            views[i].focus()

    @property
    def answer(self) -> str:
        """The reply without its reasoning."""
        return self._answer

    async def append(self, text: str) -> None:
        """Add streamed text; Markdown re-renders incrementally (fragments coalesce when it falls behind)."""
        self.content += text
        thinking, answer = split_thinking(self.content) if self.role == "assistant" else (None, self.content)
        from textual.widgets import Markdown

        answer_view = self.query_one(".answer", Markdown)
        if thinking is not None:
            if self._thinking is None:
                await self.mount(self._thinking_block(), before=answer_view)
            elif thinking != self._thinking:
                self.query_one(".thinking-text", Static).update(thinking)
            self._thinking = thinking
        if not answer.startswith(self._answer):  # what was shown was the start of a <think> after all
            await self.end_stream()
            await answer_view.update(answer)
        elif len(answer) > len(self._answer):
            if self._stream is None:
                self._stream = Markdown.get_stream(answer_view)
            await self._stream.write(answer[len(self._answer) :])
        self._answer = answer

    async def end_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
