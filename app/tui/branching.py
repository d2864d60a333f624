"""Branches in the conversation: regenerate any reply, edit any message you sent, switch between versions.

A new version never replaces the old: it is stored as a sibling (the chat store's message tree) and shown
from then on, and `<` `>` on a message switch between its versions (with what followed each). A reply
regenerated on any branch starts from the K/V blocks the engine's prefix cache already holds for the
prompt the branches share, so it computes only the tokens that differ.

Editing loads the message into the message box (multi-line as it was); Enter sends it as a new version,
Esc leaves it as it was.

A mixin of `RipeApp` (app.py); it uses the app's `store`, `chat`, `reply`, `open_chat`, `start_reply` and
`show_message`.
"""

from __future__ import annotations

from typing import Any

from ripelm.tui.status_bar import StatusBar


class Branching:
    store: Any
    chat: Any
    reply: Any
    editing: int | None = None  # the id of the message being edited in the box

    def _busy(self) -> bool:
        if self.chat is None:
            return True
        if self.reply is not None:
            self.notify("a reply is still streaming: Esc stops it", severity="warning")
            return True
        return False

    async def action_regenerate(self) -> None:
        """A new version of the last reply, from the same prompt."""
        msgs = self.store.messages(self.chat.id) if self.chat is not None else []
        if msgs and msgs[-1].role == "assistant":
            await self.regenerate_message(msgs[-1].id)

    async def regenerate_message(self, message_id: int) -> None:
        """A new version of this reply (any on the branch shown); the old one stays as a sibling."""
        if self._busy():
            return
        if self.store.message(message_id).role != "assistant":
            self.notify("r regenerates a reply; e edits a message you sent", severity="warning")
            return
        await self.start_reply(replace_from=message_id)

    def action_edit_last(self) -> None:
        """Edit the last message you sent (then Enter sends it as a new version)."""
        users = [m for m in self.store.messages(self.chat.id) if m.role == "user"] if self.chat else []
        if users:
            self.edit_message(users[-1].id)

    def edit_message(self, message_id: int) -> None:
        if self._busy():
            return
        msg = self.store.message(message_id)
        if msg.role != "user":
            self.notify("e edits a message you sent; r regenerates a reply", severity="warning")
            return
        self.editing = message_id
        box = self.query_one("#prompt")
        box.value = msg.content
        box.focus()
        self.query_one(StatusBar).show(notice="editing: Enter sends a new version, Esc keeps the message")

    def stop_editing(self) -> bool:
        """Esc while editing: the box empties and the message stays as it was."""
        if self.editing is None:
            return False
        self.editing = None
        self.query_one("#prompt").value = ""
        self.query_one(StatusBar).show(notice="edit cancelled")
        return True

    async def send_edit(self, text: str) -> None:
        """The edited text as a new version of the message, then a reply to it."""
        assert self.chat is not None and self.editing is not None
        replaced, self.editing = self.editing, None
        self.store.add_message(self.chat.id, "user", text, replace_from=replaced)
        await self.open_chat(self.chat.id)
        await self.start_reply()

    async def switch_version(self, message_id: int, step: int) -> None:
        """Show the previous (-1) or next (+1) version of a message, and the branch that follows it."""
        if self._busy():
            return
        ids = self.store.versions(self.chat.id).get(message_id)
        if not ids:
            return
        target = ids[max(0, min(len(ids) - 1, ids.index(message_id) + step))]
        if target != message_id:
            self.store.switch_to(target)
            await self.open_chat(self.chat.id)
            await self.show_message(target)
