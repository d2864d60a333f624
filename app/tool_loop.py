"""One chat reply with tools: the model's output, its tool calls run, their results appended as `tool`
messages, the model again, until it answers without a call, the calls reach the cap, or the user stops it.

Nothing here knows about the screen: `ToolLoop.events()` (on a worker thread) yields `LoopEvent`s (text,
a call about to run, its result, a notice, the end) and the app shows them. `cancel()` (any thread) stops
the round that is generating and runs no further call; it returns an event set once the loop has ended,
as `Generation.cancel` does.

Local engines: the prompt is the model's chat template with the tools rendered in (or the generic note
for templates that know no tools) and the calls are parsed from the streamed text, both by
`ripelm.runtime.tool_calls` (the same code `ripe serve` uses). A server engine (`--engine openai`) gets the
tools as OpenAI `tools` and returns its calls as `tool_calls`.

Each reply's tool turn is kept inside the context window (`ripelm.tool_room`; with a server engine by
estimate, where the server states its window): tools are no longer offered (a one-line notice says so)
once another call, its result and the answer would not fit, and a result too long for the room left is cut
with a marker.

`force` makes the first `force.rounds` rounds call a tool, through the parser's grammar (constrained
sampling): for models too small to choose, and for tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ripelm.assistant_tools.registry import Confirm, ToolBox, ToolResult, call_label
from ripelm.chat_turns import Prompt
from ripelm.context_fit import fit_conversation
from ripelm.generation import Generation
from ripelm.runtime.backend import GenerationStats, prompt_ids
from ripelm.runtime.sampling import SamplingParams
from ripelm.tool_room import ToolRoom

FULL_NOTICE = "the context window is nearly full: no more tool calls in this reply"


@dataclass
class Forced:
    """Force tool calls by grammar: `choice` is "required" or {"type": "function", "function": {"name"}};
    `tools` the schemas the grammar follows (default: the offered tools')."""

    choice: Any = "required"
    rounds: int = 1
    tools: list[dict[str, Any]] | None = None


@dataclass
class LoopEvent:
    kind: str  # "text" | "call" | "result" | "notice" | "done"
    text: str = ""
    call_id: str = ""
    label: str = ""  # the call as shown: name(arg=value)
    result: ToolResult | None = None
    stats: GenerationStats | None = None
    tokens: int = 0  # generated so far in this reply (text events)


@dataclass
class _Call:
    id: str
    name: str
    arguments: Any


@dataclass
class ToolLoop:
    backend: Any
    messages: list[dict[str, Any]]
    params: SamplingParams
    toolbox: ToolBox
    max_calls: int = 5
    confirm: Confirm | None = None
    force: Forced | None = None
    on_trim: Callable[[int], None] | None = None
    calls_made: int = 0
    cut: bool = False  # the loop stopped at the cap
    full: bool = False  # tools stopped being offered: the context window has no room for another call
    prompt_tokens: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    _gen: Generation | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> threading.Event:
        with self._lock:
            self.cancel_requested.set()
            gen = self._gen
        if gen is not None:
            gen.cancel()
        return self.ended

    def events(self) -> Iterator[LoopEvent]:
        try:
            yield from self._run()
        finally:
            self.ended.set()

    def _run(self) -> Iterator[LoopEvent]:
        messages = list(self.messages)
        stats: GenerationStats | None = None
        rounds = 0
        tokens = 0
        named = _forced_name(self.force)
        if named is not None and self.force.tools is None and named not in self.toolbox.on:
            yield LoopEvent("notice", f"{named} is not on in this chat (/tools on {named})")
            self.force = None
        room = self._room()
        while True:
            offer = self.calls_made < self.max_calls and not self.cancel_requested.is_set()
            if offer and room is not None and not room.can_offer(messages, self.toolbox.schemas()):
                offer = False
                if not self.full:
                    self.full = True
                    yield LoopEvent("notice", FULL_NOTICE)
            forced = self.force if self.force is not None and rounds < self.force.rounds and offer else None
            calls: list[_Call] = []
            text_parts: list[str] = []
            for ev in self._round(messages, offer, forced, calls):
                if ev.kind == "text":
                    tokens += 1
                    text_parts.append(ev.text)
                    ev.tokens = tokens
                elif ev.kind == "done":
                    stats = ev.stats
                    continue
                yield ev
            rounds += 1
            if self.cancel_requested.is_set() or not calls:
                break
            run, dropped = (
                calls[: self.max_calls - self.calls_made],
                calls[self.max_calls - self.calls_made :],
            )
            messages.append(_assistant_message("".join(text_parts), run))
            for call in run:
                label = call_label(call.name, call.arguments if isinstance(call.arguments, dict) else {})
                yield LoopEvent("call", call_id=call.id, label=label)
                if self.cancel_requested.is_set():
                    result = ToolResult(call.name, {}, "stopped by the user", ok=False, refused=True)
                else:
                    result = self.toolbox.call(call.name, call.arguments, self.confirm)
                self.calls_made += 1
                message = {"role": "tool", "tool_call_id": call.id, "name": call.name,
                           "content": result.content}  # fmt: skip
                if room is not None:  # what the model reads is what the app shows and stores
                    result = replace(result, content=room.fit_result(messages, message))
                    message["content"] = result.content
                yield LoopEvent("result", call_id=call.id, label=label, result=result)
                messages.append(message)
            if dropped or self.calls_made >= self.max_calls:
                self.cut = True  # the next round offers no tools: the model answers from what it has
                skipped = f" ({len(dropped)} more not run)" if dropped else ""
                yield LoopEvent("notice", f"stopped at {self.max_calls} tool calls in one reply{skipped}")
            if self.cancel_requested.is_set():
                break
        if stats is not None and self.cancel_requested.is_set():
            stats.finish_reason = "cancelled"
        yield LoopEvent("done", stats=stats)

    def _room(self) -> ToolRoom | None:
        """The measure of the context window's room: the prompt rendered and tokenized for a local engine;
        for a server engine (`--engine openai`) the estimate `remote_fit` fits its conversations by, the
        tool schemas counted as their JSON; None when the server has stated no window."""
        b = self.backend
        if getattr(b.caps, "takes_messages", False):
            if not getattr(b, "context_length", None):
                return None
            from ripelm.remote_fit import GUESSED_TOKENS_PER_BYTE, message_bytes

            rate = getattr(b, "tokens_per_byte", None) or GUESSED_TOKENS_PER_BYTE

            def estimate(msgs: list[dict[str, Any]], schemas: list[dict[str, Any]]) -> int:
                texts = [{**m, "content": (m.get("content") or "") + json.dumps(m.get("tool_calls") or "")}
                         for m in msgs]  # fmt: skip
                return int(rate * (message_bytes(texts) + len(json.dumps(schemas).encode()))) + 1

            return ToolRoom(estimate, b.context_length, self.params.max_tokens)
        from ripelm.runtime.tool_calls import parser_for

        parser = parser_for(b.template.source, getattr(b, "arch", None))

        def count(msgs: list[dict[str, Any]], schemas: list[dict[str, Any]]) -> int:
            return len(b.tokenizer.encode(parser.render(b.template, msgs, schemas), add_bos=False))

        return ToolRoom(count, b.context_length, self.params.max_tokens)

    # ---- one model round -----------------------------------------------------------------------------
    def _round(self, messages: list[dict[str, Any]], offer: bool, forced: Forced | None,
               calls: list[_Call]) -> Iterator[LoopEvent]:  # fmt: skip
        schemas = self.toolbox.schemas() if offer else []
        if getattr(self.backend.caps, "takes_messages", False):
            yield from self._remote_round(messages, schemas, forced, calls)
        else:
            yield from self._local_round(messages, schemas, forced, calls)

    def _local_round(self, messages, schemas, forced, calls) -> Iterator[LoopEvent]:  # noqa: ANN001
        from ripelm.runtime.tool_calls import parser_for

        b = self.backend
        parser = parser_for(b.template.source, getattr(b, "arch", None))
        prompt = self._prompt(parser, messages, schemas)
        params = self.params
        if forced is not None:
            syntax = "gbnf" if b.name == "llama.cpp" else "lark"  # llama.cpp's own grammar engine
            grammar = parser.grammar(forced.tools or schemas, forced.choice, parallel=False, syntax=syntax)
            params = replace(params, grammar=_no_free_whitespace(grammar))
        with self._lock:
            if self.cancel_requested.is_set():
                return
            self._gen = gen = Generation(b, prompt.ids, params)
        stream = parser.stream() if schemas else None
        for ev in gen.events():
            pieces = stream.feed(ev.text) if stream is not None else [_Text(ev.text)]
            if ev.done and stream is not None:
                pieces += stream.finish()
            for p in pieces:
                if p.kind == "call":
                    c = p.call
                    calls.append(_Call(c.id, c.name, c.arguments))
                elif p.text:
                    yield LoopEvent("text", p.text)
            if ev.done:
                yield LoopEvent("done", stats=ev.stats)

    def _prompt(self, parser: Any, messages: list[dict[str, Any]], schemas: list[dict[str, Any]]) -> Prompt:
        b = self.backend

        def count(msgs: list[dict[str, Any]]) -> int:
            return len(b.tokenizer.encode(parser.render(b.template, msgs, schemas), add_bos=False))

        fitted = fit_conversation(messages, count, b.context_length, self.params.max_tokens)
        if fitted.dropped and self.on_trim is not None:
            self.on_trim(fitted.dropped)
        ids = prompt_ids(b, parser.render(b.template, fitted.messages, schemas), add_bos=False)
        self.prompt_tokens = len(ids)
        return Prompt(ids, fitted)

    def _remote_round(self, messages, schemas, forced, calls) -> Iterator[LoopEvent]:  # noqa: ANN001
        raw: list[dict[str, Any]] = []
        choice = forced.choice if forced is not None else None
        if forced is not None and forced.tools:
            schemas = forced.tools  # the schemas the server's grammar follows
        from ripelm.remote_fit import fit_before_sending

        for ev in self.backend.stream_chat(
            fit_before_sending(self.backend, messages, self.params),  # older turns out, by estimate
            self.params,
            self.cancel_requested,
            tools=schemas or None,
            tool_choice=choice,
            calls_out=raw,
        ):
            if ev.done:
                yield LoopEvent("done", stats=ev.stats)
            elif ev.text:
                yield LoopEvent("text", ev.text)
        for c in raw:
            try:
                args = json.loads(c["arguments"] or "{}")
            except json.JSONDecodeError:
                args = c["arguments"]  # handed to the toolbox, which answers that it is not an object
            calls.append(_Call(c["id"], c["name"], args))


def _forced_name(force: Forced | None) -> str | None:
    choice = force.choice if force is not None else None
    return (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None


def _no_free_whitespace(grammar: tuple[str, str]) -> tuple[str, str]:
    """The call grammar with JSON whitespace fixed (llguidance's `whitespace_flexible: false` on each
    embedded `%json` schema): a small model forced into a call otherwise fills it with spaces until its
    token budget ends (seen with the tiny test models: `<tool_call>\n{` then only spaces)."""
    kind, text = grammar
    if kind != "lark":
        return grammar
    return kind, text.replace("%json {", '%json {"x-guidance": {"whitespace_flexible": false}, ')


@dataclass
class _Text:
    text: str
    kind: str = "text"


def _assistant_message(text: str, calls: list[_Call]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": text,
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
            }
            for c in calls
        ],
    }
