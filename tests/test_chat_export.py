"""A chat as Markdown, and the code blocks of a reply (what Copy code copies)."""

from __future__ import annotations

from ripelm.chat_export import chat_markdown, code_blocks, export_filename
from ripelm.chat_store.records import CANCELLED, Chat, Message


def test_code_blocks_in_order():
    text = "Try:\n```python\nprint(1)\n```\nor\n~~~\nls -l\n~~~\nand `inline` is not a block."
    assert code_blocks(text) == ["print(1)\n", "ls -l\n"]
    assert code_blocks("no code here") == []


def test_chat_markdown_and_filename():
    chat = Chat(3, "Sum a list: in Python!", system="be brief", created=0.0)
    msgs = [
        Message(1, 3, "user", "How?"),
        Message(
            2, 3, "assistant", "Use sum [1].", state=CANCELLED, sources=[{"number": 1, "where": "a.py:1-4"}]
        ),
    ]
    md = chat_markdown(chat, msgs)
    assert md.startswith("# Sum a list: in Python!\n")
    assert "**System:**\n\nbe brief" in md
    assert "## You\n\nHow?" in md and "## Assistant (stopped)\n\nUse sum [1]." in md
    assert "- [1] a.py:1-4" in md
    assert export_filename(chat) == "ripe-chat-3-sum-a-list-in-python.md"
