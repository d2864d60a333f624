"""A process that saves, edits and deletes memories the way the chat app does, for the SIGKILL test,
until it is killed. Each write is announced before it starts ("begin": what it will do) and reported
after it committed ("done": what it did), one JSON line each, so the test knows which write was in flight.

usage: python memory_writer_proc.py CHATS.db SEED
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from ripelm.chat_store import ChatStore
from ripelm.memory import detect_memories, remember_statements, save_memory


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


def main() -> None:
    db, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    store = ChatStore(db)
    chat = store.new_chat(f"run {seed}")
    say(ev="ready", chat=chat.id)
    n = 0
    while True:
        n += 1
        kind = rng.choices(["state", "remember", "edit", "delete"], weights=[4, 3, 2, 1])[0]
        ids = [m.id for m in store.memories()]
        if kind == "state":  # a user message stating facts, saved by the detector with its provenance
            text = f"Call me Sam{seed}x{n}. I prefer {n} spaces."
            msg = store.add_message(chat.id, "user", text)
            say(ev="begin", op="save", texts=detect_memories(text))
            for s in remember_statements(store, msg.content, chat.id, msg.id):
                m = s.memory
                say(ev="done", op="save", id=m.id, chat=m.chat_id, message=m.message_id, text=m.content)
        elif kind == "remember":
            text = f"fact {seed}-{n}: " + "x" * rng.randint(1, 400)
            say(ev="begin", op="save", texts=[text])
            m = save_memory(store, text, chat.id, None)
            say(ev="done", op="save", id=m.id, chat=chat.id, message=None, text=m.content)
        elif kind == "edit" and ids:
            mem_id, text = rng.choice(ids), f"edited {seed}-{n}"
            say(ev="begin", op="edit", id=mem_id, text=text)
            store.edit_memory(mem_id, text)
            say(ev="done", op="edit", id=mem_id, text=text)
        elif kind == "delete" and ids:
            mem_id = rng.choice(ids)
            say(ev="begin", op="delete", id=mem_id)
            store.delete_memory(mem_id)
            say(ev="done", op="delete", id=mem_id)


if __name__ == "__main__":
    main()
