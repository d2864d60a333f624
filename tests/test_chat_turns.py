"""Per-chat sampling settings and the history the model sees, on the real types (no engine needed)."""

from __future__ import annotations

import pytest

from ripelm.chat_store.records import CANCELLED, DONE, ERROR, Chat, Message
from ripelm.chat_turns import format_sampling, history, parse_sampling, sampling_for
from ripelm.runtime.errors import BadSamplingError
from ripelm.runtime.sampling import SamplingParams


def test_parse_and_apply_sampling():
    defaults = SamplingParams(temperature=0.7, max_tokens=512, stop=["\n\n"])
    params = parse_sampling("temperature=0.2, max-tokens=64 seed=7", defaults)
    assert params == {"temperature": 0.2, "max_tokens": 64, "seed": 7}
    assert format_sampling(params) == "temperature=0.2 max_tokens=64 seed=7"
    chosen = sampling_for(Chat(1, "t", params=params), defaults)
    assert (chosen.temperature, chosen.max_tokens, chosen.seed, chosen.stop) == (0.2, 64, 7, ["\n\n"])
    assert sampling_for(Chat(1, "t"), defaults).temperature == 0.7
    assert parse_sampling("", defaults) == {}


@pytest.mark.parametrize("text", ["temperature", "warmth=1", "top_p=2", "max_tokens=abc", "temperature=-1"])
def test_bad_sampling_settings(text):
    with pytest.raises(BadSamplingError):
        parse_sampling(text, SamplingParams())


def test_history_keeps_stopped_replies_and_drops_failed_ones():
    chat = Chat(1, "t", system="be brief")
    msgs = [
        Message(1, 1, "user", "a"),
        Message(2, 1, "assistant", "partial answer", state=CANCELLED),
        Message(3, 1, "user", "b"),
        Message(4, 1, "assistant", "", state=ERROR),
        Message(5, 1, "user", "c", state=DONE),
    ]
    assert history(chat, msgs) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "partial answer"},
        {"role": "user", "content": "b"},
        {"role": "user", "content": "c"},
    ]
