"""Modal dialogs: a one-line text prompt (rename, edit) and a picker over a list of choices (models,
collections), and a cited passage."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option


class TextPrompt(ModalScreen[str | None]):
    AUTO_FOCUS = "#dialog-input"  # the app's own AUTO_FOCUS names its prompt, which a dialog lacks
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, title: str, value: str = ""):
        super().__init__()
        self.title_text = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text)
            yield Input(value=self.value, id="dialog-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class Picker(ModalScreen[str | None]):
    """Choose one of `choices` (value, label); Enter picks, Esc cancels."""

    AUTO_FOCUS = "#picker"
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, title: str, choices: list[tuple[str, str]]):
        super().__init__()
        self.title_text = title
        self.choices = choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text)
            yield OptionList(*[Option(label, id=value) for value, label in self.choices], id="picker")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(event.option.id)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class Passage(ModalScreen[None]):
    """A cited passage with its file and lines; Esc closes it."""

    AUTO_FOCUS = "*"
    BINDINGS = [Binding("escape", "dismiss", "Close")]

    def __init__(self, source: dict):
        super().__init__()
        self.source = source

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog passage"):
            yield Label(f"[{self.source['number']}] {self.source['where']}", markup=False)
            from textual.widgets import Markdown  # here: Markdown's import is not paid before the first paint

            yield Markdown("```text\n" + self.source["text"].strip() + "\n```")
