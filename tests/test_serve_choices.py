"""`ripe serve` (a separate process) through the official `openai` client: n parallel samples, logprobs and
top_logprobs (chat) / logprobs (completions), stop, seed, max_completion_tokens, usage in streams; and the
fields it cannot honour are a 400 naming them."""

from __future__ import annotations

import math

import pytest
from openai_servers import ripe_serve

openai = pytest.importorskip("openai")

MSG = [{"role": "user", "content": "Name three fruits."}]
M = "smollm2:135m"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with ripe_serve(None, tmp_path_factory.mktemp("home"), "--ctx", "1024") as (url, _):
        yield openai.OpenAI(base_url=url, api_key="x", max_retries=0)


def test_n_samples_streamed_and_not(client):
    out = client.chat.completions.create(model=M, messages=MSG, n=4, temperature=1.0, seed=5, max_tokens=12)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in out.choices]
    assert all(texts) and len(set(texts)) > 1
    again = client.chat.completions.create(model=M, messages=MSG, n=4, temperature=1.0, seed=5, max_tokens=12)
    assert [c.message.content for c in again.choices] == texts  # seeded: reproducible
    assert out.usage.completion_tokens <= 4 * 12 and out.usage.prompt_tokens > 0
    parts: dict[int, str] = {}
    finished = set()
    usage = None
    chunks = client.chat.completions.create(model=M, messages=MSG, n=3, temperature=1.0, seed=5,
                                            max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2} and all(parts.values())
    assert parts[0] == texts[0]  # the same seed: sample 0 as without streaming
    assert usage is not None and usage.completion_tokens > 0


def test_chat_logprobs_and_top_logprobs(client):
    out = client.chat.completions.create(model=M, messages=MSG, temperature=0, max_tokens=10, logprobs=True,
                                         top_logprobs=3)  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy: the chosen token is the best
        assert bytes(t.bytes).decode() == t.token
    assert sum(math.exp(t.logprob) for t in content[0].top_logprobs) <= 1.0 + 1e-6
    streamed = client.chat.completions.create(model=M, messages=MSG, temperature=0, max_tokens=10,
                                              logprobs=True, stream=True)  # fmt: skip
    got = [t for ch in streamed if ch.choices and ch.choices[0].logprobs
           for t in ch.choices[0].logprobs.content]  # fmt: skip
    assert [t.token for t in got] == [t.token for t in content]
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in content])


def test_completion_logprobs_stop_and_max_completion_tokens(client):
    out = client.completions.create(model=M, prompt="One, two, three,", temperature=0, max_tokens=6,
                                    logprobs=2)  # fmt: skip
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)
    stopped = client.completions.create(model=M, prompt="One, two, three,", temperature=0, max_tokens=20,
                                        stop=[","])  # fmt: skip
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    capped = client.chat.completions.create(model=M, messages=MSG, temperature=0, max_completion_tokens=3)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"presence_penalty": 0.5}, "'presence_penalty'"),
        ({"frequency_penalty": 1.0}, "'frequency_penalty'"),
        ({"logit_bias": {"42": 5}}, "'logit_bias'"),
        ({"top_logprobs": 2}, "'top_logprobs'"),
        ({"n": 0}, "'n'"),
        ({"n": 99}, "'n'"),
        ({"max_completion_tokens": "lots"}, "'max_completion_tokens'"),
    ],
)
def test_fields_we_cannot_honour_are_a_400(client, extra, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=MSG, max_tokens=4, **extra)
    assert needle in str(e.value)


def test_completion_only_fields_are_a_400(client):
    for extra, needle in [({"echo": True}, "'echo'"), ({"suffix": "end"}, "'suffix'"),
                          ({"best_of": 3}, "'best_of'"), ({"logprobs": 9}, "'logprobs'")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=M, prompt="Hi", max_tokens=4, **extra)
        assert needle in str(e.value)
