"""The sidebar: a title search box over the list of chats, most recent first."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

from ripelm.chat_store import Chat


class ChatItem(ListItem):
    def __init__(self, chat: Chat):
        super().__init__(Label(chat.title, markup=False))
        self.chat_id = chat.id


class ChatList(Vertical):
    class Selected(Message):
        def __init__(self, chat_id: int) -> None:
            super().__init__()
            self.chat_id = chat_id

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search chats", id="chat-search")
        yield ListView(id="chats")

    @property
    def search(self) -> str:
        return self.query_one("#chat-search", Input).value

    async def show(self, chats: list[Chat], current: int | None) -> None:
        view = self.query_one(ListView)
        await view.clear()
        await view.extend([ChatItem(c) for c in chats])
        ids = [c.id for c in chats]
        if current in ids:
            view.index = ids.index(current)

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.app.refresh_chat_list()  # type: ignore[attr-defined]

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one(ListView).focus()

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, ChatItem):
            self.post_message(self.Selected(event.item.chat_id))
