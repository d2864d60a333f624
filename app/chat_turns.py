"""A chat's turns against the model: the prompt from the stored history, and recording a reply as it streams.

Shared by the Textual app and anything else that writes chats (tests drive it in a subprocess that is
killed mid-reply). Nothing here knows about the screen.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ripelm.chat_store import Chat, ChatStore, Message
from ripelm.chat_store.records import CANCELLED, DONE, ERROR, PARTIAL
from ripelm.context_fit import Fitted, fit_conversation
from ripelm.runtime.backend import GenerationStats, prompt_ids
from ripelm.runtime.errors import BadSamplingError
from ripelm.runtime.sampling import SamplingParams

CHECKPOINT_S = 0.25  # how often a streaming reply is written to the database


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags of `ripe run`, `chat`, `ask` (here, away from the engines, so `ripe chat` reads
    them without importing torch before its window shows)."""
    p = SamplingParams(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=list(args.stop),
        grammar=grammar_from_args(args),
    )
    p.validate()
    return p


def grammar_from_args(args: argparse.Namespace) -> tuple[str, str] | None:
    """`ripe run --format json` / `--json-schema FILE` as a SamplingParams grammar."""
    from ripelm.models.errors import RipelmError

    if getattr(args, "format", None) == "json":
        return ("json_object", "")
    path = getattr(args, "json_schema", None)
    if path is None:
        return None
    try:
        return ("json_schema", Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise RipelmError(f"cannot read the JSON schema {path}: {e.strerror or e}") from None


def sampling_for(chat: Chat, defaults: SamplingParams) -> SamplingParams:
    """The chat's own sampling settings over the defaults (the command line's)."""
    values = {**vars(defaults), **{k: v for k, v in chat.params.items() if k in vars(defaults)}}
    values["stop"] = list(values.get("stop") or [])
    params = SamplingParams(**values)
    params.validate()
    return params


_NUMERIC = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float,
            "max_tokens": int, "seed": int}  # fmt: skip


def parse_sampling(text: str, defaults: SamplingParams) -> dict[str, Any]:
    """A chat's sampling settings from `temperature=0.2 max_tokens=256 ...` (checked against the rules
    of SamplingParams); an empty text clears them."""
    out: dict[str, Any] = {}
    for part in text.replace(",", " ").split():
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _NUMERIC:
            raise BadSamplingError(f"'{part}': use name=value with a name from {', '.join(_NUMERIC)}")
        try:
            out[key] = _NUMERIC[key](value)
        except ValueError as e:
            raise BadSamplingError(f"'{part}': {value!r} is not a number") from e
    SamplingParams(**{**vars(defaults), **out}).validate()
    return out


def format_sampling(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k in _NUMERIC)  # not the chat's tool choices


def history(chat: Chat, messages: list[Message], *, with_tools: bool = False) -> list[dict[str, Any]]:
    """What the model sees: the system prompt, then every user message and every reply that has text
    (a cancelled or interrupted reply counts with what it got to; failed ones are left out). `with_tools`:
    a reply's tool calls and their results (kept in its stats) come before it, as the model saw them."""
    out: list[dict[str, Any]] = [{"role": "system", "content": chat.system}] if chat.system else []
    for m in messages:
        calls = (m.stats or {}).get("tool_calls") if with_tools and m.role == "assistant" else None
        if calls and m.state != ERROR:
            out.extend(tool_exchange(calls))
        if m.role == "assistant" and (m.state == ERROR or not m.content):
            continue
        out.append({"role": m.role, "content": m.content})
    return out


def tool_exchange(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reply's stored tool calls (ReplyRecorder.tool_calls) as an assistant message with `tool_calls`
    and one `tool` message per result."""
    import json

    asked = [
        {"id": c["id"], "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
        for c in calls
    ]  # fmt: skip
    results = [
        {"role": "tool", "tool_call_id": c["id"], "name": c["name"], "content": c["content"]} for c in calls
    ]
    return [{"role": "assistant", "content": "", "tool_calls": asked}, *results]


@dataclass
class Prompt:
    ids: list[int]
    fitted: Fitted


def render(backend: Any, msgs: list[dict[str, str]]) -> str:
    return backend.template.render(msgs, add_generation_prompt=True)


def count_tokens(backend: Any, msgs: list[dict[str, str]]) -> int:
    """The rendered prompt's length in the backend's tokens."""
    return len(backend.tokenizer.encode(render(backend, msgs), add_bos=False))


def build_prompt(backend: Any, messages: list[dict[str, str]], params: SamplingParams) -> Prompt:
    """The chat template rendered over as much recent history as fits the context window."""
    fitted = fit_conversation(
        messages, lambda m: count_tokens(backend, m), backend.context_length, params.max_tokens
    )
    return Prompt(prompt_ids(backend, render(backend, fitted.messages), add_bos=False), fitted)


def stats_record(s: GenerationStats) -> dict[str, Any]:
    return {
        "engine": s.engine,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "generated_tokens": s.generated_tokens,
        "ttft_s": round(s.ttft_s, 4),
        "decode_tok_s": round(s.decode_tok_s, 2),
        "finish_reason": s.finish_reason,
        "drafted": s.drafted,
        "accepted": s.accepted,
    }


@dataclass
class ReplyRecorder:
    """An assistant reply stored as "partial" at once and rewritten at checkpoints while it streams."""

    store: ChatStore
    message: Message
    text: list[str] = field(default_factory=list)
    memories: list[int] = field(default_factory=list)  # ids of the memories recalled into its prompt
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # id, name, arguments, content, ok…
    _last_save: float = 0.0

    @classmethod
    def start(
        cls,
        store: ChatStore,
        chat_id: int,
        sources: list[dict[str, Any]] | None = None,
        replace_from: int | None = None,
    ) -> ReplyRecorder:
        message = store.start_reply(chat_id, sources, replace_from=replace_from)
        return cls(store, message, _last_save=time.monotonic())

    @property
    def content(self) -> str:
        return "".join(self.text)

    def feed(self, text: str) -> None:
        self.text.append(text)
        now = time.monotonic()
        if now - self._last_save >= CHECKPOINT_S:
            self.store.save_reply(self.message.id, self.content, state=PARTIAL)
            self._last_save = now

    def finish(self, stats: GenerationStats | None, *, error: bool = False) -> str:
        """Store the final text and state; returns the state."""
        if error:
            state = ERROR
        elif stats is not None and stats.finish_reason == "cancelled":
            state = CANCELLED
        else:
            state = DONE
        record = stats_record(stats) if stats is not None else None
        if self.memories:
            record = {**(record or {}), "memories": list(self.memories)}
        if self.tool_calls:  # kept with the reply: shown again when the chat is opened, and in later prompts
            record = {**(record or {}), "tool_calls": self.tool_calls}
        self.store.save_reply(self.message.id, self.content, state=state, stats=record)
        return state
