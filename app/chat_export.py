"""A chat as a Markdown document, and the code blocks of a reply (for copying)."""

from __future__ import annotations

import re
from datetime import datetime

from ripelm.chat_store import Chat, Message
from ripelm.chat_store.records import CANCELLED, PARTIAL

_FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced code blocks in a Markdown text, in order."""
    return [m.group(2) for m in _FENCE.finditer(markdown)]


def chat_markdown(chat: Chat, messages: list[Message]) -> str:
    when = datetime.fromtimestamp(chat.created).strftime("%Y-%m-%d %H:%M")
    lines = [f"# {chat.title}", "", f"*{when}, model {chat.model or 'default'}*", ""]
    if chat.system:
        lines += ["**System:**", "", chat.system, ""]
    for m in messages:
        who = {"user": "You", "assistant": "Assistant"}.get(m.role, m.role)
        note = {CANCELLED: " (stopped)", PARTIAL: " (interrupted)"}.get(m.state, "")
        lines += [f"## {who}{note}", "", m.content, ""]
        for s in m.sources or []:
            lines.append(f"- [{s.get('number')}] {s.get('where')}")
        if m.sources:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def export_filename(chat: Chat) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", chat.title.lower()).strip("-")[:40] or "chat"
    return f"ripe-chat-{chat.id}-{slug}.md"
