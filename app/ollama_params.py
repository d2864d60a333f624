"""Ollama request fields for `ripe serve`'s /api routes: `options` onto `SamplingParams`, `keep_alive`
durations, `think` output split into thinking and content, Ollama's timing fields, and a streamed
generation collected into one answer (`"stream": false`). See `ollama_api` for what is accepted."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from ripelm.models.errors import RipelmError
from ripelm.runtime.backend import GenerationStats
from ripelm.runtime.reasoning import ThinkSplitter  # noqa: F401 - ollama_api imports it from here
from ripelm.runtime.sampling import SamplingParams
from ripelm.server import ApiError

IGNORED_OPTIONS = {
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "numa", "low_vram", "f16_kv", "use_mmap",
    "use_mlock", "vocab_only", "logits_all", "num_keep", "embedding_only", "penalize_newline",
}  # fmt: skip
NEUTRAL_OPTIONS = {"presence_penalty": 0, "frequency_penalty": 0, "mirostat": 0, "typical_p": 1, "tfs_z": 1}
SAMPLING_OPTIONS = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "repeat_penalty": ("repetition_penalty", float),
    "repeat_last_n": ("repeat_last_n", int),
    "seed": ("seed", int),
}
DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?$")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds (a number) or a Go duration ("5m", "1h30m" is not used by clients,
    "300ms"); negative = keep loaded forever (None here); 0 = unload after the request."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, "'keep_alive' must be a number of seconds or a duration such as \"5m\"")
    if isinstance(value, str):
        m = DURATION.match(value.strip())
        if m is None:
            raise ApiError(400, f'\'keep_alive\' is not a duration: {value!r} (e.g. "5m", "30s", "-1")')
        seconds = float(m.group(1)) * UNITS[m.group(2)]
    else:
        seconds = float(value)
    return None if seconds < 0 else seconds


def sampling_from_options(options: Any, context_length: int) -> SamplingParams:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object")
    params = SamplingParams(max_tokens=context_length)
    for key, val in options.items():
        if val is None or key in IGNORED_OPTIONS:
            continue
        if key in NEUTRAL_OPTIONS:
            if val != NEUTRAL_OPTIONS[key]:
                raise ApiError(400, f"'options.{key}' is not supported (only {NEUTRAL_OPTIONS[key]})")
            continue
        if key == "stop":
            stop = [val] if isinstance(val, str) else val
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise ApiError(400, "'options.stop' must be a list of strings")
            params.stop = stop
            continue
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            if key in SAMPLING_OPTIONS or key == "num_predict":
                raise ApiError(400, f"'options.{key}' must be a number")
            raise ApiError(400, f"'options.{key}' is not supported")
        if key == "num_predict":
            n = int(val)
            if n == 0:
                raise ApiError(400, "'options.num_predict' must be positive, or -1 for no limit")
            params.max_tokens = context_length if n < 0 else n
        elif key in SAMPLING_OPTIONS:
            field, cast = SAMPLING_OPTIONS[key]
            v = cast(val)
            if key == "repeat_last_n" and v < 0:
                v = context_length
            setattr(params, field, v)
        else:
            raise ApiError(400, f"'options.{key}' is not supported")
    try:
        params.validate()
    except RipelmError as e:
        raise ApiError(400, f"'options': {e}") from e
    return params


def timings(stats: GenerationStats, started: float) -> dict[str, Any]:
    return {
        "done_reason": "length" if stats.finish_reason == "length" else "stop",
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": int(stats.ttft_s * 1e9),
        "eval_count": stats.generated_tokens,
        "eval_duration": int(max(stats.total_s - stats.ttft_s, 0.0) * 1e9),
    }


def collect(lines: Iterator[dict[str, Any]], *, chat: bool) -> dict[str, Any]:
    """A whole generation as one object (`"stream": false`)."""
    thinking, content, last = [], [], {}
    for last in lines:
        part = last.get("message", {}) if chat else last
        thinking.append(part.get("thinking", ""))
        content.append(part.get("content" if chat else "response", ""))
    text, thought = "".join(content), "".join(thinking)
    if chat:
        last["message"] = {"role": "assistant", "content": text, **({"thinking": thought} if thought else {})}
    else:
        last["response"] = text
        if thought:
            last["thinking"] = thought
    return last


def collect_last(lines: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The last line of a stream (a pull's final status with `"stream": false`)."""
    last: dict[str, Any] = {}
    for last in lines:  # noqa: B007
        pass
    return last


def grammar_from_format(fmt: Any) -> tuple[str, str] | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema, as the request's grammar (the same
    grammar-constrained sampling as OpenAI's `response_format`); anything else is a 400 naming it."""
    import json

    from ripelm.runtime.errors import BadSamplingError
    from ripelm.runtime.grammar import validate_grammar

    if fmt in (None, ""):
        return None
    if fmt == "json":
        return ("json_object", "")
    if not isinstance(fmt, dict):
        raise ApiError(400, "'format' must be \"json\" or a JSON schema object")
    grammar = ("json_schema", json.dumps(fmt))
    try:
        validate_grammar(grammar)
    except BadSamplingError as e:
        raise ApiError(400, f"'format': {e}") from None
    return grammar
