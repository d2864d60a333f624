"""Fitting a conversation into an OpenAI-compatible server's context window (`--engine openai`).

As for the local engines (`context_fit`), whole turns are left out from the front and the system prompt
stays. The server owns the tokenizer, so here tokens are estimated from the messages' UTF-8 size at a
rate (tokens per byte) measured from the server's own counts: the prompt size in each reply's usage, or
in an overflow error. Until the server has given one, the rate is a cautious guess.

1. Before sending, when the window is known (the server's model listing gives it, or an earlier overflow
   error did), the conversation is fitted to it by that estimate.
2. If the server still refuses the prompt as too long (before any text came), the request is sent once
   more with more of the oldest turns left out: fitted by the rate the error's numbers give, where it
   gives them, else with the older half of the turns left out. A second refusal is the user's error, one
   line in the server's words.

`on_trim(dropped)` is told, once per reply, how many earlier messages were left out.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ripelm.context_fit import Messages, fit_conversation, turn_starts
from ripelm.runtime.backend import TokenEvent
from ripelm.runtime.errors import ContextOverflowError
from ripelm.runtime.sampling import SamplingParams

GUESSED_TOKENS_PER_BYTE = 0.35  # English BPE runs ~0.25, code and other scripts more: err towards cutting
MESSAGE_OVERHEAD_BYTES = 16  # a chat template's role markers around each message


def message_bytes(messages: Messages) -> int:
    return sum(len(m["content"].encode("utf-8")) + MESSAGE_OVERHEAD_BYTES for m in messages)


def _estimate(rate: float) -> Callable[[Messages], int]:
    return lambda msgs: math.ceil(message_bytes(msgs) * rate)


def _body(messages: Messages) -> Messages:
    return [m for m in messages if m["role"] != "system"]


def _from_turn(messages: Messages, index: int) -> Messages:
    """The system message(s) and the body from its `index`-th turn on."""
    body = _body(messages)
    starts = turn_starts(body)
    return [m for m in messages if m["role"] == "system"] + body[starts[index] :]


def fit_before_sending(backend: Any, messages: Messages, params: SamplingParams) -> Messages:
    """The conversation fitted to the server's window by the estimate (all of it if the window is unknown)."""
    window = backend.context_length
    if window is None:
        return messages
    rate = backend.tokens_per_byte or GUESSED_TOKENS_PER_BYTE
    try:
        return fit_conversation(messages, _estimate(rate), window, params.max_tokens).messages
    except ContextOverflowError:
        return _from_turn(messages, -1)  # by the guess not even the last turn fits: the server judges


def fit_after_refusal(
    backend: Any, sent: Messages, params: SamplingParams, refusal: ContextOverflowError
) -> Messages:
    """Less of `sent` after the server refused it as too long; re-raises `refusal` if nothing can go."""
    if refusal.context_length:
        backend.context_length = refusal.context_length
    if refusal.prompt_tokens:
        backend.tokens_per_byte = refusal.prompt_tokens / message_bytes(sent)
    window = backend.context_length
    if window and refusal.prompt_tokens:
        fitted = fit_conversation(sent, _estimate(backend.tokens_per_byte), window, params.max_tokens)
        if fitted.dropped:
            return fitted.messages
    starts = turn_starts(_body(sent))
    if len(starts) < 2:
        raise refusal
    return _from_turn(sent, len(starts) // 2)  # no numbers to go by: the older half of the turns goes


def remote_reply(
    backend: Any,
    messages: Messages,
    params: SamplingParams,
    cancel: threading.Event | None = None,
    on_trim: Callable[[int], None] | None = None,
) -> Iterator[TokenEvent]:
    """`backend.stream_chat` over as much of the conversation as the server's window takes."""
    sent = fit_before_sending(backend, messages, params)
    events = backend.stream_chat(sent, params, cancel)
    try:
        first = next(events)  # a refusal comes before any text
    except ContextOverflowError as refusal:
        sent = fit_after_refusal(backend, sent, params, refusal)
        events = backend.stream_chat(sent, params, cancel)
        first = next(events)
    dropped = len(_body(messages)) - len(_body(sent))
    if dropped and on_trim is not None:
        on_trim(dropped)
    for ev in itertools.chain([first], events):
        if ev.done and ev.stats is not None and ev.stats.prompt_tokens > 0:
            backend.tokens_per_byte = ev.stats.prompt_tokens / message_bytes(sent)
        yield ev
