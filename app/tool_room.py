"""Room in the context window for one reply's tool calls (local engines; `ripelm.tool_loop` uses it).

Each call and its result stay in the prompt for the rest of the reply, and older turns can be dropped
(`context_fit`) but not the current one: the user's message, the calls and their results. Left alone, a
loop grows that turn until it no longer fits and the reply ends with an error. So before a round offers
tools, `can_offer` checks that the turn as it is, with the tool schemas rendered in, still leaves room for
another call and a useful result besides the room kept for the answer; when it does not, the loop stops
offering tools (and says so) and the model answers from what it has. And a result too long for the room
left is cut, with a marker that says so, to the longest prefix with which the turn still fits
(`fit_result`): the model reads what there is room for instead of the reply failing.

The measure is the real one: the conversation rendered by the model's template (as the prompt will be)
and tokenized by its tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CALL_ROOM = 48  # tokens kept for a call in the model's syntax (its name and arguments)
RESULT_ROOM = 64  # the least a result needs for a call to be worth making
# no total: a result the toolbox already cut at its own cap (RESULT_CHARS) has no true length to give here
MARKER = "\n[… cut here to fit the context window, after {shown} characters]"

Messages = list[dict[str, Any]]


def current_turn(messages: Messages) -> Messages:
    """The system message(s) and the messages from the last user message on: what must always fit."""
    system = [m for m in messages if m["role"] == "system"]
    body = [m for m in messages if m["role"] != "system"]
    last = max((i for i, m in enumerate(body) if m["role"] == "user"), default=0)
    return system + body[last:]


def cut(content: str, keep: int) -> str:
    return content[:keep] + MARKER.format(shown=keep)


class ToolRoom:
    """`count(messages, schemas)`: the rendered prompt's length in tokens. The reply's room is what
    `context_fit` keeps: `reply_room` tokens, at most half the window."""

    def __init__(self, count: Callable[[Messages, list], int], context_length: int, reply_room: int):
        self.count = count
        self.limit = context_length - min(max(1, reply_room), context_length // 2)

    def can_offer(self, messages: Messages, schemas: list[dict[str, Any]]) -> bool:
        """Whether another call and its result can still fit after the turn so far, answer room aside."""
        return self.count(current_turn(messages), schemas) + CALL_ROOM + RESULT_ROOM <= self.limit

    def fit_result(self, messages: Messages, tool_message: dict[str, Any]) -> str:
        """The tool message's content, cut (with the marker) so that the turn with it appended fits."""
        content = tool_message["content"]
        turn = current_turn(messages)

        def fits(text: str) -> bool:
            return self.count([*turn, {**tool_message, "content": text}], []) <= self.limit

        if fits(content):
            return content
        lo, hi = 0, len(content) - 1  # the longest prefix that fits: a binary search on its length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(cut(content, mid)):
                lo = mid
            else:
                hi = mid - 1
        return cut(content, lo)
