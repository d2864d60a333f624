"""Reasoning split from the answer: `<think>...</think>` as `reasoning_content`, on text fixtures (whole
and in pieces, with tags cut across pieces), on the real Qwen3 and DeepSeek-R1 templates (the latter opens
the block in the prompt), together with tool calls, and through `ripe serve` on a Qwen3-architecture tiny
model carrying Qwen3's template (request field and config.toml switch thinking off)."""

from __future__ import annotations

import pytest
from openai_servers import ripe_serve
from test_tool_calls import TEMPLATES

from ripelm.openai_chat import ChatPlan, plan_chat
from ripelm.runtime.chat_template import ChatTemplate
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.tool_calls import ToolParser
from ripelm.server import ApiError

FIXTURES = [  # (output, inside an opened block, reasoning, content)
    ("<think>\nThe user greets me.\n</think>\n\nHello!", False, "\nThe user greets me.\n", "\n\nHello!"),
    ("Just an answer, <think> is a word.", False, "", "Just an answer, <think> is a word."),
    ("2 + 2 is 4, checked.</think>The answer is 4.", True, "2 + 2 is 4, checked.", "The answer is 4."),
    ("<think>cut off while thinking", False, "cut off while thinking", ""),
    ("<think></think>Direct.", False, "", "Direct."),
]


def run(plan: ChatPlan, text: str, size: int) -> tuple[str, str, list]:
    deltas = []
    for i in range(0, len(text), size):
        deltas += plan.feed(text[i : i + size])
    deltas += plan.feed("", done=True)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    return reasoning, content, [d["tool_calls"] for d in deltas if "tool_calls" in d]


@pytest.mark.parametrize("text,inside,reasoning,content", FIXTURES)
def test_text_fixtures_split_whole_and_streamed(text, inside, reasoning, content):
    for size in (1, 2, 5, 1000):
        assert run(ChatPlan("", None, True, inside), text, size)[:2] == (reasoning, content)
    msg = ChatPlan("", None, True, inside).message(text)
    assert msg["content"] == content and msg.get("reasoning_content", "") == reasoning


def test_without_a_thinking_template_nothing_is_split():
    msg = ChatPlan("", None, False).message("<think>x</think>y")
    assert msg == {"role": "assistant", "content": "<think>x</think>y"}


def test_reasoning_then_tool_calls():
    call = '<tool_call>\n{"name": "w", "arguments": {"c": 1}}\n</tool_call>'
    text = "<think>\nI need the weather.\n</think>\n\n" + call
    for size in (1, 3, 1000):
        reasoning, content, calls = run(ChatPlan("", ToolParser("hermes"), True), text, size)
        assert reasoning == "\nI need the weather.\n" and content == ""
        assert [c[0]["function"] for c in calls] == [{"name": "w", "arguments": '{"c": 1}'}]
    plan = ChatPlan("", ToolParser("hermes"), True)
    msg = plan.message(text)
    assert msg["content"] is None and msg["reasoning_content"] and plan.finish_reason("stop") == "tool_calls"


class _Backend:  # what plan_chat reads of a backend: its template and engine name
    name = "native"

    def __init__(self, template: ChatTemplate):
        self.template = template


def template(name: str) -> ChatTemplate:
    path = TEMPLATES / f"{name}.jinja"
    if not path.exists():
        pytest.skip(f"{path} is missing: packaging/install_test_tools.sh extracts llama.cpp's templates")
    return ChatTemplate(path.read_text(), eos_token="<|im_end|>")


def test_real_templates_thinking_on_off_and_opened_by_the_prompt():
    ask = {"messages": [{"role": "user", "content": "2 + 2?"}]}
    qwen3 = _Backend(template("Qwen-Qwen3-0.6B"))
    on = plan_chat(qwen3, ask, SamplingParams())
    off = plan_chat(qwen3, {**ask, "chat_template_kwargs": {"enable_thinking": False}}, SamplingParams())
    assert on.split and not on.inside and on.prompt.endswith("<|im_start|>assistant\n")
    assert off.prompt.endswith("<think>\n\n</think>\n\n")
    r1_template = template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")  # llama.cpp's copy: off by default
    think = {**ask, "chat_template_kwargs": {"enable_thinking": True}}
    r1 = plan_chat(_Backend(r1_template), think, SamplingParams())
    assert r1.inside and r1.message("Simple: 4.\n</think>\n\n4") == {
        "role": "assistant", "content": "\n\n4", "reasoning_content": "Simple: 4.\n"}


def test_reasoning_effort_is_the_thinking_switch_where_the_template_has_one():
    ask = {"messages": [{"role": "user", "content": "2 + 2?"}]}
    qwen3 = _Backend(template("Qwen-Qwen3-0.6B"))
    off_kw = {**ask, "chat_template_kwargs": {"enable_thinking": False}}
    off = plan_chat(qwen3, off_kw, SamplingParams()).prompt
    on = plan_chat(qwen3, ask, SamplingParams()).prompt
    for effort in ("none", "minimal"):
        assert plan_chat(qwen3, {**ask, "reasoning_effort": effort}, SamplingParams()).prompt == off
    for effort in ("low", "medium", "high"):
        assert plan_chat(qwen3, {**ask, "reasoning_effort": effort}, SamplingParams()).prompt == on
    explicit = {**ask, "reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}
    assert plan_chat(qwen3, explicit, SamplingParams()).prompt == off  # chat_template_kwargs win
    plain = _Backend(template("Qwen-Qwen2.5-7B-Instruct"))  # no thinking mode: accepted, no effect
    assert plan_chat(plain, {**ask, "reasoning_effort": "none"}, SamplingParams()).prompt == plan_chat(
        plain, ask, SamplingParams()).prompt
    r1 = _Backend(template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"))  # cannot switch off: no effect
    assert plan_chat(r1, {**ask, "reasoning_effort": "none"}, SamplingParams()).prompt == plan_chat(
        r1, ask, SamplingParams()).prompt
    for bad in ("max", 3, True):
        with pytest.raises(ApiError, match="'reasoning_effort' must be one of"):
            plan_chat(qwen3, {**ask, "reasoning_effort": bad}, SamplingParams())


openai = pytest.importorskip("openai")
FORCED = 'root ::= "<think>" "The user asks for a city." "</think>" "Paris"'


def test_qwen3_tiny_model_through_ripe_serve(tmp_path, tiny_model_factory):
    path = TEMPLATES / "Qwen-Qwen3-0.6B.jinja"
    if not path.exists():
        pytest.skip(f"{path} is missing: packaging/install_test_tools.sh extracts llama.cpp's templates")
    gguf = tiny_model_factory(arch="qwen3", chat_template=path.read_text())
    kw = dict(model="m", messages=[{"role": "user", "content": "Capital of France?"}], temperature=0,
              max_tokens=60, extra_body={"grammar": FORCED})  # fmt: skip
    with ripe_serve(gguf, tmp_path, "--ctx", "1024") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = c.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert msg.content == "Paris" and msg.model_extra["reasoning_content"] == "The user asks for a city."
        reasoning, content = [], []
        for chunk in c.chat.completions.create(**kw, stream=True):
            d = chunk.choices[0].delta
            content.append(d.content or "")
            reasoning.append((d.model_extra or {}).get("reasoning_content") or "")
        assert "".join(content) == "Paris" and "".join(reasoning) == "The user asks for a city."
        off = c.chat.completions.create(**{**kw, "extra_body": {"grammar": FORCED,
                                        "chat_template_kwargs": {"enable_thinking": False}}})  # fmt: skip
        assert off.usage.prompt_tokens > r.usage.prompt_tokens  # the template's empty thinking block
        low = c.chat.completions.create(**kw, reasoning_effort="none")  # OpenAI's field: the same switch
        assert low.usage.prompt_tokens == off.usage.prompt_tokens
        high = c.chat.completions.create(**kw, reasoning_effort="high")
        assert high.usage.prompt_tokens == r.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="'reasoning_effort' must be one of"):
            c.chat.completions.create(**{**kw, "extra_body": {"grammar": FORCED, "reasoning_effort": "max"}})
    (tmp_path / "config.toml").write_text("[serve]\nthinking = false\n")
    with ripe_serve(gguf, tmp_path, "--ctx", "1024") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        assert c.chat.completions.create(**kw).usage.prompt_tokens == off.usage.prompt_tokens
