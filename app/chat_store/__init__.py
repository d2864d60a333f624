"""Chat history in SQLite: chats, messages, schema migrations."""

from ripelm.chat_store.records import Chat, Message
from ripelm.chat_store.store import ChatStore, ChatStoreError, chats_db_path

__all__ = ["Chat", "ChatStore", "ChatStoreError", "Message", "chats_db_path"]
