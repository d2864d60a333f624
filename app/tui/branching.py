"""Regenerate a reply and edit a message you sent.

A mixin of `RipeApp` (app.py); it uses the app's `store`, `chat`, `reply`, `open_chat` and `start_reply`.
"""

from __future__ import annotations

from typing import Any

from ripelm.tui.dialogs import TextPrompt
from ripelm.tui.message_view import MessageView


class Branching:
    store: Any
    chat: Any
    reply: Any

    async def action_regenerate(self) -> None:
        """Replace the last reply with a new one from the same prompt (its K/V come from the prefix cache)."""
        if self.chat is None or self.reply is not None:
            return
        msgs = self.store.messages(self.chat.id)
        if not msgs or msgs[-1].role != "assistant":
            return
        views = list(self.query(MessageView))
        if views and views[-1].message_id == msgs[-1].id:
            await views[-1].remove()
        await self.start_reply(replace_from=msgs[-1].id)

    def action_edit_last(self) -> None:
        """Edit the last message you sent and send it again (what followed it is replaced)."""
        if self.chat is None or self.reply is not None:
            return
        users = [m for m in self.store.messages(self.chat.id) if m.role == "user"]
        if not users:
            return
        last, chat_id = users[-1], self.chat.id

        async def done(text: str | None) -> None:
            if text and text.strip():
                msg = self.store.add_message(chat_id, "user", text.strip(), replace_from=last.id)
                await self.open_chat(chat_id)
                assert msg.id
                await self.start_reply()

        self.push_screen(TextPrompt("Edit and resend", last.content), done)

