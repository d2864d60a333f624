"""What the app shows of tools: each call with its result as a collapsed block above the reply, the
dialog that asks before a shell command runs, and the messages the tool worker posts to the app."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Collapsible, Label, Static

from ripelm.assistant_tools.registry import ToolResult


class ToolCallView(Collapsible):
    """One call: `🔧 name(args)` as the title, its result inside (collapsed until the user opens it)."""

    DEFAULT_CSS = """
    ToolCallView { margin: 0 1; }
    ToolCallView .tool-result { color: $text-muted; }
    """

    def __init__(self, call_id: str, label: str):
        self.call_id = call_id
        self.label = label
        self.result: ToolResult | None = None
        self._body = Static("running…", classes="tool-result", markup=False)
        super().__init__(self._body, title=f"tool: {label}", collapsed=True, classes="tool-call")

    def show_result(self, result: ToolResult) -> None:
        self.result = result
        mark = "✓" if result.ok else ("✗ refused" if result.refused else "✗")
        self.title = f"tool: {self.label} {mark}"
        self._body.update(result.content or "(no output)")

    @property
    def result_text(self) -> str:
        return self.result.content if self.result is not None else ""


class ConfirmCommand(ModalScreen[bool]):
    """The exact command the model wants to run; it runs only on Run (or `y`). Esc, `n` or Don't run: no."""

    AUTO_FOCUS = "#confirm-no"  # Enter on the dialog as it opens refuses: running needs a deliberate choice
    BINDINGS = [
        Binding("escape", "answer(False)", "Don't run"),
        Binding("n", "answer(False)", "Don't run"),
        Binding("y", "answer(True)", "Run"),
    ]

    def __init__(self, tool: str, command: str):
        super().__init__()
        self.tool = tool
        self.command = command

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"The model wants to run ({self.tool}):")
            yield Static(self.command, id="confirm-command", markup=False)
            with Horizontal():
                yield Button("Run (y)", id="confirm-yes", variant="warning")
                yield Button("Don't run (n)", id="confirm-no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, run: bool) -> None:
        self.dismiss(run)


class ToolCallStarted(Message):
    def __init__(self, generation_id: int, call_id: str, label: str) -> None:
        super().__init__()
        self.generation_id = generation_id
        self.call_id = call_id
        self.label = label


class ToolCallFinished(Message):
    def __init__(self, generation_id: int, call_id: str, result: ToolResult) -> None:
        super().__init__()
        self.generation_id = generation_id
        self.call_id = call_id
        self.result = result
