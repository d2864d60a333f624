"""A process that writes a chat the way the app does, for the SIGKILL test: two finished turns, then a
third reply streamed from the real engine into the store (ReplyRecorder checkpoints) until it is killed.

usage: python chat_writer_proc.py MODEL.gguf CHATS.db
Prints "streaming <message id>" once the partial reply has been checkpointed with text.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ripelm.chat_store import ChatStore
from ripelm.chat_turns import ReplyRecorder, build_prompt, history
from ripelm.generation import Generation
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.sampling import SamplingParams


def main() -> None:
    model, db = Path(sys.argv[1]), Path(sys.argv[2])
    backend = EngineBackend(model, device="cpu", n_ctx=2048, kv_memory=32 << 20)
    store = ChatStore(db)
    chat = store.new_chat("kill test")
    for i in range(2):
        store.add_message(chat.id, "user", f"question {i}")
        store.add_message(chat.id, "assistant", f"answer {i}")
    store.add_message(chat.id, "user", "now a very long answer please")
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=1500)
    prompt = build_prompt(backend, history(chat, store.messages(chat.id)), params)
    recorder = ReplyRecorder.start(store, chat.id)
    announced = False
    for ev in Generation(backend, prompt.ids, params).events():
        if ev.text:
            recorder.feed(ev.text)
        if not announced and store.message(recorder.message.id).content:
            print(f"streaming {recorder.message.id}", flush=True)
            announced = True
    recorder.finish(None)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
