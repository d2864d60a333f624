"""The chat's memory commands, the same in the Textual app and `ripe chat --plain`:

    /remember TEXT     save TEXT as a memory (always, even with the automatic saving off)
    /forget N|TEXT     delete memory #N, or the one memory whose text contains TEXT
    /memories          list them (the app opens its memory panel)
    /memory on|off     recall and automatic saving for this chat (/memory alone: the current state)

`run` does the database part and returns what to show; the caller applies a per-chat toggle (the app
stores it with the chat, the plain chat keeps it for the session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ripelm.chat_store import ChatStore, ChatStoreError
from ripelm.chat_store.records import Memory
from ripelm.memory import save_memory

COMMANDS = ("/remember", "/forget", "/memories", "/memory")
HELP = "/remember TEXT · /forget N|TEXT · /memories · /memory on|off"


@dataclass
class Result:
    text: str
    error: bool = False
    panel: bool = False  # the app shows its memory panel
    toggle: bool | None = None  # memory on (True) or off (False) for this chat
    memory: Memory | None = None  # the memory saved or deleted


def parse(text: str) -> tuple[str, str] | None:
    """(command, argument) when the text is a memory command, else None (it is a message)."""
    head, _, arg = text.strip().partition(" ")
    if head.lower() in COMMANDS:
        return head.lower(), arg.strip()
    return None


def describe(store: ChatStore, m: Memory) -> str:
    """'#3 The user's name is Sam.  (from "Intro")', the chat named while it exists."""
    where = ""
    if m.chat_id is not None:
        try:
            where = f'  (from "{store.chat(m.chat_id).title}")'
        except ChatStoreError:
            where = ""
    return f"#{m.id} {m.content}{where}"


def listing(store: ChatStore) -> str:
    memories = store.memories()
    if not memories:
        return 'no memories yet: /remember TEXT, or tell me about yourself ("call me Sam")'
    return "\n".join(describe(store, m) for m in memories)


def _forget(store: ChatStore, arg: str) -> Result:
    if not arg:
        return Result("which memory? /forget N (see /memories) or /forget TEXT", error=True)
    if arg.lstrip("#").isdigit():
        try:
            gone = store.delete_memory(int(arg.lstrip("#")))
        except ChatStoreError as e:
            return Result(str(e), error=True)
        return Result(f"forgot #{gone.id}: {gone.content}", memory=gone)
    hits = [m for m in store.memories() if arg.lower() in m.content.lower()]
    if not hits:
        return Result(f"no memory contains '{arg}'", error=True)
    if len(hits) > 1:
        found = "; ".join(f"#{m.id} {m.content}" for m in hits[:5])
        return Result(f"{len(hits)} memories contain '{arg}': /forget one by number ({found})", error=True)
    gone = store.delete_memory(hits[0].id)
    return Result(f"forgot #{gone.id}: {gone.content}", memory=gone)


def run(
    store: ChatStore,
    command: str,
    arg: str,
    *,
    chat_id: int | None,
    message_id: int | None,
    enabled: bool,
    chat_memory: bool,
) -> Result:
    """`enabled`: memory on in config.toml; `chat_memory`: on for this chat. `message_id`: the message a
    /remember refers to (the chat's last one: where the user was when saying it)."""
    if not enabled:
        return Result("memory is off in config.toml ([memory] enabled = false)", error=True)
    if command == "/remember":
        if not arg:
            return Result("what should I remember? /remember TEXT", error=True)
        try:
            m = save_memory(store, arg, chat_id, message_id)
        except ChatStoreError as e:
            return Result(str(e), error=True)
        note = "" if chat_memory else " (memory is off for this chat: it is used in the others)"
        return Result(f"remembered #{m.id}: {m.content}{note}", memory=m)
    if command == "/forget":
        return _forget(store, arg)
    if command == "/memories":
        return Result(listing(store), panel=True)
    word = arg.lower()
    if word in ("on", "off"):
        on = word == "on"
        return Result(f"memory is {word} for this chat", toggle=on)
    if word:
        return Result("use /memory on or /memory off", error=True)
    state = "on" if chat_memory else "off"
    return Result(f"memory is {state} for this chat; {len(store.memories())} memories stored. {HELP}")


class PlainMemory:
    """Memory for `ripe chat --plain`, which keeps no chat history: memories saved there have no chat or
    message to point back to. Opens the chat database only when memory is on in config.toml."""

    def __init__(self, config: Any, store: ChatStore | None = None):
        from ripelm.memory_recall import MemoryEmbedder

        self.config = config
        self.on = True  # /memory on|off, for this session
        self.store = store if store is not None or not config.enabled else ChatStore()
        self.embedder = MemoryEmbedder()
        self.used: list[Memory] = []  # recalled into the last prompt

    def command(self, line: str) -> str | None:
        """What a memory command prints, or None when the line is a message."""
        parsed = parse(line)
        if parsed is None:
            return None
        if self.store is None:
            return "memory is off in config.toml ([memory] enabled = false)"
        result = run(self.store, *parsed, chat_id=None, message_id=None, enabled=True, chat_memory=self.on)
        if result.toggle is not None:
            self.on = result.toggle
        return result.text

    def noticed(self, line: str) -> list[str]:
        """Save the facts the user states in a message (when memory is on); a note for each new one."""
        from ripelm.memory import remember_statements

        if self.store is None or not self.on or not self.config.auto:
            return []
        saved = remember_statements(self.store, line, None, None)
        return [
            f"[remembered #{s.memory.id}: {s.memory.content} · /forget {s.memory.id}]" for s in saved if s.new
        ]

    def prompt(self, messages: list[dict[str, str]], backend: Any) -> list[dict[str, str]]:
        """The messages to send: the memories recalled for the last one put in front of it."""
        from ripelm.memory_recall import recall, token_counter, with_memories

        self.used = []
        if self.store is None or not self.on or self.config.budget_tokens <= 0:
            return messages
        self.used = recall(
            self.store, messages[-1]["content"], self.embedder.get(), token_counter(backend),
            self.config.budget_tokens,
        )  # fmt: skip
        return with_memories(messages, self.used)

    def close(self) -> None:
        self.embedder.close()
        if self.store is not None:
            self.store.close()
