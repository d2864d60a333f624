"""Fitting a conversation into the context window: drop the oldest turns, keep the system prompt.

A chat grows without bound but the model sees at most `context_length` tokens, and the reply needs room
too. `fit_conversation` keeps the system message(s) and the newest messages, dropping whole turns from
the front (a user message with the replies that follow it) until the rendered prompt plus the room
kept for the reply fits. The newest user message always stays; if even that does not fit, it is the
user's to shorten (`ContextOverflowError`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ripelm.runtime.errors import ContextOverflowError

Messages = list[dict[str, str]]


@dataclass
class Fitted:
    messages: Messages  # what to send: system message(s) + the newest turns
    dropped: int  # how many earlier messages were left out
    prompt_tokens: int  # the rendered prompt's length in tokens


def turn_starts(body: Messages) -> list[int]:
    """Indexes where a turn begins: each user message (a leading non-user message starts one too)."""
    starts = [i for i, m in enumerate(body) if m["role"] == "user"]
    if body and (not starts or starts[0] != 0):
        starts.insert(0, 0)
    return starts


def fit_conversation(
    messages: Messages, count_tokens: Callable[[Messages], int], context_length: int, reply_room: int
) -> Fitted:
    """`count_tokens(messages)`: the rendered prompt's token count. `reply_room`: tokens kept free for the
    reply (capped at half the window so a big max_tokens does not empty the history)."""
    room = min(max(1, reply_room), context_length // 2)
    limit = context_length - room
    system = [m for m in messages if m["role"] == "system"]
    body = [m for m in messages if m["role"] != "system"]
    starts = turn_starts(body)
    for cut in starts:
        kept = system + body[cut:]
        n = count_tokens(kept)
        if n <= limit:
            return Fitted(kept, cut, n)
    raise ContextOverflowError(
        f"the last message does not fit the context window of {context_length} tokens "
        f"(with {room} kept for the reply); shorten it or raise --ctx"
    )
