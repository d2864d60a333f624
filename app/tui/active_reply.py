"""The reply being generated in the chat app: its chat, its generation, where it is stored and shown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ripelm.chat_turns import ReplyRecorder
from ripelm.generation import Generation, RemoteGeneration
from ripelm.tui.message_view import MessageView
from ripelm.tui.messages import DELTA_INTERVAL_S


@dataclass
class ActiveReply:
    """The reply being generated: its chat, its generation, where it is stored and shown."""

    id: int
    chat_id: int
    generation: Generation | RemoteGeneration | Any  # a ToolLoop with tools; None until it starts
    recorder: ReplyRecorder
    view: MessageView | None
    cancel_pressed: float | None = None
    prompt_tokens: int = 0  # set by the worker once the prompt is built
    shown_at: float = 0.0  # when the status bar numbers were last refreshed
    delta_interval: float = DELTA_INTERVAL_S  # seconds between streamed-text updates (next_delta_interval)
    ui_cpu: float | None = None  # the UI thread's CPU time (time.thread_time) at the last update
    remote: bool = False  # from a server engine: no token counts while it streams
