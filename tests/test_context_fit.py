"""The chat's context-window policy: oldest turns go first, the system prompt and the last message stay."""

from __future__ import annotations

import pytest

from ripelm.context_fit import fit_conversation
from ripelm.runtime.errors import ContextOverflowError


def words(messages: list[dict[str, str]]) -> int:
    """A stand-in token count that is easy to reason about: one token per word, plus 2 per message."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def convo(turns: int, system: bool = True) -> list[dict[str, str]]:
    out = [{"role": "system", "content": "be brief"}] if system else []
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i} " + "w " * 8})
        out.append({"role": "assistant", "content": f"answer {i} " + "w " * 8})
    out.append({"role": "user", "content": "last question"})
    return out


def test_everything_fits_nothing_dropped():
    msgs = convo(2)
    fitted = fit_conversation(msgs, words, context_length=1000, reply_room=100)
    assert fitted.messages == msgs and fitted.dropped == 0
    assert fitted.prompt_tokens == words(msgs)


def test_oldest_turns_dropped_whole_system_kept():
    msgs = convo(5)  # system 4 + 10 messages of 11 + last 4 = 118
    fitted = fit_conversation(msgs, words, context_length=100, reply_room=40)  # limit 60
    assert fitted.messages[0] == msgs[0]
    assert fitted.messages[-1] == msgs[-1]
    body = fitted.messages[1:]
    assert body[0]["role"] == "user"  # cut at a turn boundary
    assert fitted.dropped == len(msgs) - len(fitted.messages)
    assert fitted.dropped % 2 == 0 and fitted.dropped > 0
    assert fitted.prompt_tokens <= 60
    # the newest turns are the ones kept: one more turn would not have fitted
    assert words([msgs[0], *msgs[1 + fitted.dropped - 2 :]]) > 60


def test_reply_room_capped_at_half_the_window():
    msgs = convo(1)
    fitted = fit_conversation(msgs, words, context_length=80, reply_room=10_000)
    assert fitted.dropped == 0  # 30 tokens fit in the 40 left when the reply room is capped


def test_last_message_too_long_raises():
    msgs = [{"role": "user", "content": "w " * 500}]
    with pytest.raises(ContextOverflowError):
        fit_conversation(msgs, words, context_length=100, reply_room=10)


def test_no_system_prompt_and_leading_assistant():
    msgs = [{"role": "assistant", "content": "hello " * 30}, *convo(1, system=False)]
    fitted = fit_conversation(msgs, words, context_length=60, reply_room=10)
    assert fitted.messages == msgs[1:]
    assert fitted.dropped == 1
