"""Chat history in SQLite: chats, messages, memories, schema migrations."""

from ripelm.chat_store.records import Chat, Memory, Message
from ripelm.chat_store.store import ChatStore, ChatStoreError, chats_db_path

__all__ = ["Chat", "ChatStore", "ChatStoreError", "Memory", "Message", "chats_db_path"]
