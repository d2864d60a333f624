"""The chat app's memory: the `/remember`, `/forget`, `/memories`, `/memory on|off` commands typed in the
prompt, the facts the user states saved as they are sent (ripelm.memory), memories recalled into each
reply's prompt (ripelm.memory_recall), the memory panel, and opening the message a memory came from.

A mixin of `RipeApp` (app.py). Database work stays on the UI thread: `memory_gather` runs there before a
reply starts, `recall_into` runs in the generation worker (it embeds) and hands vectors it made back to
the UI thread to store.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from textual.app import SystemCommand
from textual.screen import Screen

from ripelm.chat_store import ChatStoreError
from ripelm.chat_store.records import Memory
from ripelm.config import MemoryConfig
from ripelm.memory import remember_statements
from ripelm.memory_commands import parse, run
from ripelm.memory_recall import (
    Gathered,
    MemoryEmbedder,
    fit_budget,
    gather,
    rank,
    store_vectors,
    token_counter,
    with_memories,
)
from ripelm.tui.memory_panel import MemoryPanel
from ripelm.tui.status_bar import StatusBar


class MemoryActions:
    store: Any
    chat: Any
    memory_config: MemoryConfig
    memory_embedder: MemoryEmbedder
    memory_notices: list[str]  # what the app said about memories (the tests read it)
    recalled_turns: list[dict[str, str]] | None  # the last prompt memories were recalled into

    def setup_memory(self, config: MemoryConfig | None) -> None:
        self.memory_config = config or MemoryConfig()
        self.memory_embedder = MemoryEmbedder()
        self.memory_notices = []
        self.recalled_turns = None

    def _memory_note(self, text: str, *, error: bool = False) -> None:
        self.memory_notices.append(text)
        self.notify(text, title="memory", severity="error" if error else "information")

    def memory_on(self) -> bool:
        return self.memory_config.enabled and self.chat is not None and self.chat.memory

    async def memory_command(self, text: str) -> bool:
        """Run a memory command typed in the prompt; False when the text is a message to send."""
        parsed = parse(text)
        if parsed is None or self.chat is None:
            return False
        msgs = self.store.messages(self.chat.id)
        result = run(
            self.store, *parsed, chat_id=self.chat.id, message_id=msgs[-1].id if msgs else None,
            enabled=self.memory_config.enabled, chat_memory=self.chat.memory,
        )  # fmt: skip
        if result.toggle is not None:
            self.chat = self.store.update_chat(self.chat.id, memory=result.toggle)
        if result.panel:
            self.action_memories()
        else:
            self._memory_note(result.text, error=result.error)
        return True

    def notice_memories(self, text: str, message_id: int) -> None:
        """Save the facts the user states in a message just sent, and say so."""
        if not (self.memory_on() and self.memory_config.auto):
            return
        for saved in remember_statements(self.store, text, self.chat.id, message_id):
            if saved.new:
                m = saved.memory
                self._memory_note(f"remembered #{m.id}: {m.content} · /forget {m.id} to drop it")

    def memory_gather(self, query: str) -> Gathered | None:
        """The memories' search data for the reply about to start (UI thread); None when memory is off."""
        if not self.memory_on() or self.memory_config.budget_tokens <= 0:
            return None
        found = gather(self.store, query)
        return found if found.memories else None

    def recall_into(
        self, turns: list[dict[str, str]], found: Gathered | None, backend: Any, reply: Any
    ) -> list[dict[str, str]]:
        """In the generation worker: the turns with the recalled memories in front of the last message."""
        if found is None:
            return turns
        embedder = self.memory_embedder.get()
        with self.memory_embedder.busy:  # shared with the message search's background embedding
            ranked = rank(found, embedder)
        if ranked.vectors:
            self.call_from_thread(store_vectors, self.store, ranked)
        used = fit_budget(ranked.memories, token_counter(backend), self.memory_config.budget_tokens)
        if not used:
            return turns
        reply.recorder.memories = [m.id for m in used]
        note = f"{len(used)} memor{'y' if len(used) == 1 else 'ies'} recalled"
        self.call_from_thread(self.query_one(StatusBar).show, notice=note)
        self.recalled_turns = with_memories(turns, used)
        return self.recalled_turns

    def action_memories(self) -> None:
        """The memory panel: see, edit and delete memories; Enter opens where one was said."""
        if isinstance(self.screen, MemoryPanel):  # F7 is a priority key: it also reaches the panel
            return
        self.push_screen(MemoryPanel(self.store), self._memory_chosen)

    async def _memory_chosen(self, memory: Memory | None) -> None:
        if memory is not None:
            await self.open_memory_source(memory)

    async def open_memory_source(self, memory: Memory) -> bool:
        """Switch to the chat a memory was saved in and select its message (its branch shown first)."""
        try:
            if memory.chat_id is None or memory.message_id is None:
                raise ChatStoreError("it was saved outside a chat")
            self.store.chat(memory.chat_id)
            msg = self.store.message(memory.message_id)
        except ChatStoreError as e:
            self._memory_note(f"#{memory.id} has no message to open: {e}", error=True)
            return False
        if msg.id not in {m.id for m in self.store.messages(msg.chat_id)}:
            self.store.switch_to(msg.id)
        await self.open_chat(msg.chat_id)
        await self.show_message(msg.id)
        return True

    def action_toggle_memory(self) -> None:
        if self.chat is None:
            return
        self.chat = self.store.update_chat(self.chat.id, memory=not self.chat.memory)
        self._memory_note(f"memory is {'on' if self.chat.memory else 'off'} for this chat")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)  # type: ignore[misc]
        yield SystemCommand("Memories", "See, edit and delete what is remembered", self.action_memories)
        yield SystemCommand(
            "Memory for this chat", "Turn recall and saving on or off here", self.action_toggle_memory
        )
