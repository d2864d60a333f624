"""`/v1/chat/completions` beyond plain text: tools and reasoning, from the request to the answer.

In: `tools`, `tool_choice` ("auto", "none", "required" or a named function), `parallel_tool_calls`,
assistant messages with `tool_calls` and `tool` messages (the results) on later turns. The model's own
chat template renders them (`runtime.tool_calls`); for "required" or a named function the output is
constrained by a grammar to a valid call in the model's syntax, with arguments that follow the tool's
schema, so that even the bundled 135M model makes one. Out: the calls as `message.tool_calls` with
`finish_reason` "tool_calls", or streamed as `delta.tool_calls` (one whole call per delta).

Reasoning: a template that thinks (Qwen3, DeepSeek-R1 distills) has its `<think>...</think>` block
returned as `reasoning_content` (vLLM's and llama.cpp's server's name), streamed as such, never in
`content`. `chat_template_kwargs: {"enable_thinking": false}` in a request (as vLLM, SGLang and llama.cpp's
server take it) or `thinking = false` under `[serve]` in config.toml turns thinking off where the template
can; `chat_template_kwargs` reach the template as variables. OpenAI's `reasoning_effort` is read as that same
switch, the only one these templates have: "none" and "minimal" turn thinking off, "low", "medium" and
"high" on (the templates have no effort levels: the three are the same); an explicit `enable_thinking` in
`chat_template_kwargs` wins. On a model whose template has no switch (no thinking mode, or one that always
thinks) a valid `reasoning_effort` is accepted and has no effect; any other value is a 400 naming it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from ripelm.runtime.reasoning import ThinkSplitter, can_switch_off, opens_thinking, thinks
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.tool_calls import ToolCall, ToolParser, ToolStream, parser_for

CHOICES = ("auto", "none", "required")
EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}
RESERVED = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


def _error(message: str):  # noqa: ANN202 - the server's ApiError (imported late: server imports this module)
    from ripelm.server import ApiError

    return ApiError(400, message)


@functools.cache
def config_thinking() -> bool | None:
    """`thinking` under `[serve]` in config.toml (None: the template's default)."""
    from ripelm.config import load_config

    return load_config().thinking


@dataclass
class ChatPlan:
    """One chat request: its prompt text, and how its output becomes content, reasoning and calls."""

    prompt: str
    parser: ToolParser | None = None  # set when the output is to be parsed for calls
    split: bool = False  # split a leading <think> block off as reasoning
    inside: bool = False  # the prompt opened the <think> block
    calls: list[ToolCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._think = ThinkSplitter(self.inside) if self.split else None
        self._tools: ToolStream | None = self.parser.stream() if self.parser else None
        self._blank = ""

    def feed(self, text: str, done: bool = False) -> list[dict[str, Any]]:
        """Deltas (`{"content": ...}`, `{"reasoning_content": ...}`, `{"tool_calls": [...]}`) for new text;
        `done`: the text is the last, flush what was held back."""
        reasoning, content = self._think.feed(text) if self._think else ("", text)
        if done and self._think:
            r, c = self._think.flush()
            reasoning, content = reasoning + r, content + c
        out: list[dict[str, Any]] = [{"reasoning_content": reasoning}] if reasoning else []
        if self._tools is None:
            return out + ([{"content": content}] if content else [])
        events = self._tools.feed(content) if content else []
        if done:
            events += self._tools.finish()
        for e in events:
            if e.call is not None:
                out.append({"tool_calls": [{"index": len(self.calls), **e.call.openai()}]})
                self.calls.append(e.call)
            elif (self._blank + e.text).strip():
                out.append({"content": self._blank + e.text})
                self._blank = ""
            else:  # blanks between or after calls are no content: held until text follows
                self._blank += e.text
        if done and self._blank and not self.calls:
            out.append({"content": self._blank})
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls else reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole answer as a chat message."""
        deltas = self.feed(text, done=True)
        content = "".join(d.get("content", "") for d in deltas)
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if self.calls:
            msg["content"] = content.strip() or None
            msg["tool_calls"] = [c.openai() for c in self.calls]
        if reasoning:
            msg["reasoning_content"] = reasoning
        return msg


def plan_chat(backend: Any, body: dict[str, Any], params: SamplingParams) -> ChatPlan:
    """Check a chat request's messages, tools and reasoning fields (a 400 naming the field for a bad one),
    render its prompt, and set `params.grammar` when a call is forced."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _error("'messages' must be a non-empty list")
    history_tools = _check_messages(messages)
    tools = _check_tools(body.get("tools"))
    choice = _check_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    parallel = True if parallel is None else parallel
    if not isinstance(parallel, bool):
        raise _error("'parallel_tool_calls' must be true or false")
    source = backend.template.source
    variables = _template_kwargs(body, source)
    forced = bool(tools) and choice not in ("auto", "none")
    if forced:
        if params.grammar is not None:
            raise _error("'tool_choice' and 'response_format' both constrain the output: send one")
        syntax = "gbnf" if backend.name == "llama.cpp" else "lark"
        parser = parser_for(source)
        try:
            params.grammar = parser.grammar(tools, choice, parallel=parallel, syntax=syntax)
        except Exception as e:  # a tool's schema the grammar library refuses
            raise _error(f"'tools': a parameters schema cannot be enforced: {e}") from None
        if can_switch_off(source) and "enable_thinking" not in variables:
            variables["enable_thinking"] = False  # the grammar forces the call at once: no thinking block
    active = tools if choice != "none" else []
    parser = parser_for(source) if (active or history_tools) else None
    if parser is not None:
        try:
            prompt = parser.render(backend.template, messages, active, **variables)
        except ValueError as e:  # arguments of an earlier call that are not a JSON object
            raise _error(f"'messages': {e}") from None
    else:
        prompt = backend.template.render(messages, add_generation_prompt=True, **variables)
    split = thinks(source) or opens_thinking(prompt)
    return ChatPlan(prompt, parser if active else None, split, split and opens_thinking(prompt))


def _check_messages(messages: list) -> bool:
    """Every message well formed; True when the conversation has tool calls or results in it."""
    tooling = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _error(f"'messages[{i}]' needs a 'role' and a 'content'")
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls:
            tooling = True
            if not isinstance(calls, list):
                raise _error(f"'messages[{i}].tool_calls' must be a list")
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise _error(f"'messages[{i}].tool_calls[{j}].function.name' is required")
                if not isinstance(fn.get("arguments", "{}"), (str, dict)):
                    raise _error(f"'messages[{i}].tool_calls[{j}].function.arguments' must be a JSON string")
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise _error(f"'messages[{i}].content' must be a string")
            continue
        if m["role"] == "tool":
            tooling = True
        if not isinstance(m.get("content"), str):
            raise _error(f"'messages[{i}]' needs a 'role' and a 'content'")
    return tooling


def _check_tools(tools: Any) -> list[dict]:
    if tools in (None, []):
        return []
    if not isinstance(tools, list):
        raise _error("'tools' must be a list of functions")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise _error(f"'tools[{i}].type': only function tools are supported")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _error(f"'tools[{i}].function.name' is required")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _error(f"'tools[{i}].function.parameters' must be a JSON schema object")
    return [{"type": "function", "function": t["function"]} for t in tools]


def _check_choice(choice: Any, tools: list[dict]) -> Any:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise _error(f"'tool_choice' must be one of {', '.join(CHOICES)} or a named function")
        if choice == "required" and not tools:
            raise _error("'tool_choice' is 'required' but there are no 'tools'")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise _error("'tool_choice' must be one of auto, none, required or {\"type\": \"function\", ...}")
    if name not in {t["function"]["name"] for t in tools}:
        raise _error(f"'tool_choice.function.name' {name!r} is not one of the 'tools'")
    return choice


def _template_kwargs(body: dict[str, Any], source: str) -> dict[str, Any]:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _error("'chat_template_kwargs' must be an object")
    bad = [k for k in kwargs if k in RESERVED or not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise _error(f"'chat_template_kwargs.{bad[0]}' cannot be set")
    out = dict(kwargs)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise _error(f"'reasoning_effort' must be one of {', '.join(EFFORTS)}")
    if effort is not None and "enable_thinking" not in out and can_switch_off(source):
        out["enable_thinking"] = EFFORTS[effort]  # honoured where the template has the switch
    think = out.get("enable_thinking", config_thinking())
    if think is None:
        return out
    if not isinstance(think, bool):
        raise _error("'chat_template_kwargs.enable_thinking' must be true or false")
    if think is False and thinks(source) and not can_switch_off(source):
        if "enable_thinking" in kwargs:
            raise _error("'chat_template_kwargs.enable_thinking': this model's template cannot switch it off")
        return out  # the config's default: the model just thinks
    out["enable_thinking"] = think
    return out

