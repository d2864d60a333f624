"""Tool calls: a model's tools rendered into its prompt, and its output parsed back into calls.

Each model family writes calls in its own syntax, and its chat template (from the GGUF) knows how to show it
the tools and the calls it made before:

* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call (Qwen2.5,
  Qwen3, Hermes);
* ``llama3``: the whole answer is ``{"name": ..., "parameters": {...}}`` (after an optional
  ``<|python_tag|>``), several calls separated by ``;`` (Llama 3.1-3.3);
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (Mistral v3: Nemo, 7B v0.3) or
  ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` (v11: Small 3.2, Devstral);
* ``generic``: a template that knows no tools (the bundled SmolLM2) gets a system note that lists them and
  asks for the hermes form, which is then parsed the same way.

A parser is a small state machine over the streamed text: text before a call streams through as it comes,
a possible start of a call is held back until it is either a call (then one complete `ToolCall` comes out)
or not (then it is text after all), so a partial call never reaches a client as text. Why our own: the
parsers of vLLM and llama.cpp's server live inside those servers (Python tied to vLLM's request types; C++
in llama.cpp's common/chat.cpp, which llama-cpp-python does not expose). `tool_grammar` builds the grammar
that forces a call for ``tool_choice`` "required" or a named function.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
from dataclasses import dataclass
from typing import Any

FAMILIES = ("hermes", "llama3", "mistral", "generic")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    id: str  # "call_<random>"
    name: str
    arguments: dict

    def openai(self) -> dict[str, Any]:
        """The call as OpenAI's `tool_calls` entry (arguments as a JSON string)."""
        args = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}


@dataclass(frozen=True)
class ToolEvent:
    kind: str  # "text" | "call"
    text: str = ""
    call: ToolCall | None = None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _call_from(obj: Any) -> ToolCall | None:
    """A ToolCall from a decoded `{"name": ..., "arguments": {...}}` ("parameters" for Llama 3), or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI's own shape, as some fine-tunes write it
        return _call_from(obj["function"])
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], args)


def _held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held back until known)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


class ToolStream:
    """Incremental parser: `feed(delta)` and `finish()` return `ToolEvent`s (text deltas, whole calls)."""

    def __init__(self, family: str):
        self.family = family
        self.buf = ""
        self.inside = False  # past the start of a call (hermes: inside a block; others: in the calls part)
        self.started = False  # llama3: the first non-blank character has been seen
        self.calls = 0

    def feed(self, delta: str) -> list[ToolEvent]:
        self.buf += delta
        if self.family == "llama3":
            return self._llama3(final=False)
        if self.family == "mistral":
            return self._mistral(final=False)
        return self._hermes(final=False)

    def finish(self) -> list[ToolEvent]:
        if self.family == "llama3":
            return self._llama3(final=True)
        if self.family == "mistral":
            return self._mistral(final=True)
        return self._hermes(final=True)

    def _call(self, call: ToolCall, out: list[ToolEvent]) -> None:
        self.calls += 1
        out.append(ToolEvent("call", call=call))

    def _text(self, text: str, out: list[ToolEvent]) -> None:
        if text:
            out.append(ToolEvent("text", text=text))

    # -- hermes (and generic): <tool_call>{...}</tool_call> blocks anywhere in the text --------------------
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def _hermes(self, final: bool) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        while True:
            if not self.inside:
                i = self.buf.find(self.OPEN)
                if i < 0:
                    keep = 0 if final else _held_prefix(self.buf, self.OPEN)
                    self._text(self.buf[: len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out
                self._text(self.buf[:i], out)
                self.buf, self.inside = self.buf[i + len(self.OPEN) :], True
            j = self.buf.find(self.CLOSE)
            if j < 0 and not final:
                return out
            body = self.buf if j < 0 else self.buf[:j]
            call = _json_call(body)
            if call is not None:
                self._call(call, out)
            else:  # not a call after all: the block is text
                self._text(self.OPEN + body + ("" if j < 0 else self.CLOSE), out)
            self.buf = "" if j < 0 else self.buf[j + len(self.CLOSE) :]
            self.inside = False
            if j < 0:
                return out

    # -- llama3: the answer is one or more JSON calls (after an optional <|python_tag|>) ---------------------
    PYTHON_TAG = "<|python_tag|>"

    def _llama3(self, final: bool) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        if not self.started:
            head = self.buf.lstrip()
            if not head or (not final and _held_prefix(head, self.PYTHON_TAG) == len(head)):
                if final:
                    self._text(self.buf, out)
                    self.buf = ""
                return out
            self.started = True
            self.inside = head.startswith(("{", self.PYTHON_TAG))
        if not self.inside:
            self._text(self.buf, out)
            self.buf = ""
            return out
        calls, rest, ok = _scan_json_calls(self.buf.lstrip().removeprefix(self.PYTHON_TAG), ";")
        if not ok or (final and rest.strip()):  # not (only) calls: all of it is text
            self._text(self.buf, out)
            self.buf, self.inside = "", False
            return out
        if final:
            for call in calls:
                self._call(call, out)
            self.buf = ""
        return out

    # -- mistral: [TOOL_CALLS] then a JSON array of calls, or name[CALL_ID]id[ARGS]{...} per call ---------
    MARK = "[TOOL_CALLS]"

    def _mistral(self, final: bool) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        if not self.inside:
            i = self.buf.find(self.MARK)
            if i < 0:
                keep = 0 if final else _held_prefix(self.buf, self.MARK)
                self._text(self.buf[: len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep :]
                return out
            self._text(self.buf[:i], out)
            self.buf, self.inside = self.buf[i:], True
        while True:
            s = self.buf.lstrip()
            if not final and len(s) < len(self.MARK) and self.MARK.startswith(s):
                return out  # perhaps the next call's marker
            if s.startswith(self.MARK):
                s = s[len(self.MARK) :]
            s = s.lstrip(" \n\t[,]")
            self.buf = s
            if not s:
                return out
            if s.startswith("{"):
                try:
                    obj, end = _DECODER.raw_decode(s)
                except ValueError:
                    break
                call = _call_from(obj)
            else:
                a = s.find("[ARGS]")
                if a < 0:
                    break
                name = s[:a].split("[CALL_ID]")[0].strip()
                try:
                    args, end = _DECODER.raw_decode(s, a + len("[ARGS]"))
                except ValueError:
                    break
                call = _call_from({"name": name, "arguments": args})
            if call is None:
                break
            self._call(call, out)
            self.buf = s[end:]
        if final:  # what is left is not a call
            self._text(self.buf if self.calls else self.MARK + self.buf, out)
            self.buf = ""
        return out


def _json_call(body: str) -> ToolCall | None:
    try:
        return _call_from(json.loads(body))
    except ValueError:
        return None


def _scan_json_calls(text: str, sep: str) -> tuple[list[ToolCall], str, bool]:
    """Complete JSON calls at the start of `text` (separated by `sep` or blanks), what follows them, and
    False when something there is a complete JSON value but not a call."""
    calls: list[ToolCall] = []
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == sep):
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            return calls, text[pos:], True
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return calls, text[pos:], True
        call = _call_from(obj)
        if call is None:
            return calls, text[pos:], False
        calls.append(call)


GENERIC_NOTE = (
    "You can call these tools (each given as a JSON schema):\n<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer with only this, one block per call:\n"
    '<tool_call>\n{{"name": <the tool\'s name>, "arguments": <the arguments as a JSON object>}}\n</tool_call>'
)


class ToolParser:
    """One family's prompt rendering, output parsing and call grammar."""

    def __init__(self, family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown tool-call family {family!r}")
        self.family = family

    def __repr__(self) -> str:
        return f"ToolParser({self.family!r})"

    def render(self, template, messages: list[dict], tools: list[dict], **variables: Any) -> str:  # noqa: ANN001
        """Prompt text (with the generation prompt): the model's template renders the tools, the assistant's
        earlier calls and the `tool` results; a template without tools gets the generic system note."""
        msgs = template_messages(messages, self.family)
        if self.family == "generic":
            return template.render(generic_messages(msgs, tools), add_generation_prompt=True, **variables)
        if tools:
            variables["tools"] = tools
        return template.render(msgs, add_generation_prompt=True, **variables)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content without the calls, and the calls."""
        s = self.stream()
        events = s.feed(text) + s.finish()
        calls = [e.call for e in events if e.call is not None]
        content = "".join(e.text for e in events if e.kind == "text")
        return (content.strip() if calls else content), calls

    def stream(self) -> ToolStream:
        return ToolStream(self.family)

    def grammar(self, tools: list[dict], choice: Any, parallel: bool = True, syntax: str = "lark"):  # noqa: ANN201
        """(kind, text) for SamplingParams.grammar forcing a valid call in this family's syntax: "lark" for
        the native engine (llguidance), "gbnf" for llama.cpp. See `tool_grammar`."""
        from ripelm.runtime.tool_grammar import call_grammar

        return call_grammar(self.family, tools, choice, parallel=parallel, syntax=syntax)


def parser_for(chat_template: str | None, arch: str | None = None) -> ToolParser:
    """The family from the model's chat template text (the template decides how calls are rendered; the
    architecture is only a hint for a template that names no syntax but renders `tools`)."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return ToolParser("hermes")
    if "[TOOL_CALLS]" in t:
        return ToolParser("mistral")
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "tools" in t):
        return ToolParser("llama3")
    if "tools" in t and arch in ("qwen2", "qwen3"):
        return ToolParser("hermes")
    return ToolParser("generic")


def _arguments(args: Any) -> dict:
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}  # ValueError for the caller to report
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return args


def _short_id(call_id: Any) -> str:
    """Mistral's templates insist on 9 alphanumeric characters: a stable one per OpenAI call id."""
    s = str(call_id)
    if len(s) == 9 and s.isalnum():
        return s
    digest = hashlib.sha256(s.encode()).digest()
    alphabet = string.ascii_letters + string.digits
    return "".join(alphabet[b % len(alphabet)] for b in digest[:9])


def template_messages(messages: list[dict], family: str) -> list[dict]:
    """Messages as chat templates expect them: call arguments as objects (OpenAI sends JSON strings),
    content never None, Mistral's 9-character call ids, Llama 3's one call per assistant message."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_call_id") is not None and family == "mistral":
            m["tool_call_id"] = _short_id(m["tool_call_id"])
        calls = m.get("tool_calls")
        if not calls:
            m.pop("tool_calls", None)
            out.append(m)
            continue
        fixed = []
        for c in calls:
            fn = c.get("function") or {}
            cid = c.get("id") or new_call_id()
            fixed.append({
                "id": _short_id(cid) if family == "mistral" else cid, "type": "function",
                "function": {"name": fn.get("name", ""), "arguments": _arguments(fn.get("arguments"))},
            })  # fmt: skip
        if family == "llama3" and len(fixed) > 1:  # its template takes one call per message
            out.extend({**m, "content": "", "tool_calls": [c]} for c in fixed)
        else:
            out.append({**m, "tool_calls": fixed})
    return out


def generic_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template without tools: the tools in a system note, earlier calls as hermes blocks in the
    assistant's text, tool results as user messages."""
    out: list[dict] = []
    for m in messages:
        if m.get("role") == "tool":
            result = f"<tool_response>\n{m.get('content', '')}\n</tool_response>"
            out.append({"role": "user", "content": result})
        elif m.get("tool_calls"):
            blocks = [
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"][
                    "arguments"]}) + "\n</tool_call>" for c in m["tool_calls"]
            ]  # fmt: skip
            text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            out.append({"role": "assistant", "content": text})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if not tools:
        return out
    note = GENERIC_NOTE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if out and out[0].get("role") == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{note}"}] + out[1:]
    return [{"role": "system", "content": note}] + out
