"""The choices of an OpenAI completion: `n` parallel samples, `logprobs`, and the response objects.

`n > 1` on the native engine is one engine request with n samples: they share the prompt's K/V blocks (the
last, partly filled block is copied on first write) and are batched together; each runs the same text
pipeline (`runtime.backend.stream`: stop strings, budget) on a thread of its own, and a sample that stops
early (a stop string) cancels only itself. Engines without parallel samples (llama.cpp) run the n samples
one after another (seeds seed, seed + 1, ... as the engine's forks use). `logprobs` (chat: `logprobs` and
`top_logprobs`; completions: `logprobs` as the number of alternatives) are the engine's log-softmax at each
token (`runtime.token_logprobs`); an engine that cannot report them makes them a 400 naming the field.
Fields whose meaning we cannot honour (`logit_bias`, `presence_penalty`, `frequency_penalty`, `echo`,
`suffix`, `best_of` > n) are a 400 naming them as well.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

from ripelm.runtime.backend import GenerationStats, TokenEvent, stream
from ripelm.runtime.sampling import SamplingParams

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}
MAX_N = 16  # the engine batches up to 16 rows per decode step
PENALTIES = ("presence_penalty", "frequency_penalty")


def _error(message: str):  # noqa: ANN202 - the server's ApiError (imported late: it imports this module)
    from ripelm.server import ApiError

    return ApiError(400, message)


def choice_options(path: str, body: dict[str, Any], backend: Any) -> tuple[int, int | None]:
    """The request's (n, top logprobs or None), checked: anything we cannot honour is a 400 naming it."""
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise _error(f"'n' must be an integer from 1 to {MAX_N}")
    for key in PENALTIES:
        val = body.get(key)
        if val not in (None, 0, 0.0):
            raise _error(f"'{key}' is not supported (use 'repeat_penalty')")
    if body.get("logit_bias"):
        raise _error("'logit_bias' is not supported")
    if body.get("echo"):
        raise _error("'echo' is not supported")
    if body.get("suffix"):
        raise _error("'suffix' is not supported (no fill-in-the-middle)")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _error("'best_of' is not supported (only best_of = n)")
    top = _logprobs(path, body)
    if top is not None and not backend.caps.logprobs:
        raise _error(f"'logprobs' needs the native engine ({backend.name} does not report them)")
    return n, top


def _logprobs(path: str, body: dict[str, Any]) -> int | None:
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if path.endswith("chat/completions"):
        if lp not in (None, True, False):
            raise _error("'logprobs' must be true or false")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise _error("'top_logprobs' must be an integer from 0 to 20")
        if top and not lp:
            raise _error("'top_logprobs' needs 'logprobs': true")
        return (top or 0) if lp else None
    if top is not None:
        raise _error("'top_logprobs' is for chat completions (completions take 'logprobs': N)")
    if lp is None or lp is False:
        return None
    if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
        raise _error("'logprobs' must be an integer from 0 to 5")
    return lp


# ---- running the samples ----------------------------------------------------------------------------
class _Sample:
    """Sample i of an engine request, as a backend whose generation is that sample (for `stream`)."""

    def __init__(self, backend: Any, req: Any, index: int):
        self.backend, self.req, self.index = backend, req, index
        self.name, self.tokenizer = backend.name, backend.tokenizer
        self.context_length = backend.context_length

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        return self.backend.request_ids(self.req, stats, self.index)


@contextmanager
def _held(backend: Any) -> Iterator[Any]:
    from ripelm.model_pool import PooledBackend

    if isinstance(backend, PooledBackend):  # hold the pool's model for the whole request
        with backend.pool.use(backend.model) as m:
            yield m.backend
    else:
        yield backend


def samples(
    api: Any, ids: list[int], params: SamplingParams, n: int, cancel: threading.Event
) -> Iterator[tuple[int, TokenEvent, GenerationStats]]:
    """(sample index, event, that sample's stats as of the event) of n samples, as they come."""
    backend = api.backend
    if n == 1 or not backend.caps.samples:
        for i in range(n):
            p = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            stats = GenerationStats()
            with api.lock or nullcontext():
                for ev in stream(backend, ids, p, cancel, stats):
                    yield i, ev, stats
        return
    with _held(backend) as b:
        req = b.submit(ids, params, n)
        out: queue.Queue = queue.Queue()

        def run(i: int) -> None:
            stats = GenerationStats()
            try:
                for ev in stream(_Sample(b, req, i), ids, params, cancel, stats):
                    out.put((i, ev, stats))
            except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
                out.put((i, e, stats))

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        try:
            left = n
            while left:
                i, ev, stats = out.get()
                if isinstance(ev, BaseException):
                    raise ev
                left -= ev.done
                yield i, ev, stats
        finally:
            req.cancel()  # no-op once every sample finished; else (an error, the client left) stop them


# ---- the response objects ---------------------------------------------------------------------------
def usage(all_stats: list[GenerationStats]) -> dict:
    """OpenAI's usage: the prompt once, the completion tokens of every choice."""
    prompt = all_stats[0].prompt_tokens if all_stats else 0
    done = sum(s.generated_tokens for s in all_stats)
    out: dict = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
    drafted = sum(s.drafted for s in all_stats)
    if drafted:  # speculation (`ripe serve --speculate`): OpenAI's fields for predicted tokens
        accepted = sum(s.accepted for s in all_stats)
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        }
    return out


class _Logprobs:
    """One sample's logprobs in OpenAI's shapes, handed out as the tokens they belong to are counted."""

    def __init__(self, tokenizer: Any, chat: bool):
        self.tokenizer, self.chat, self.sent, self.offset = tokenizer, chat, 0, 0

    def _text(self, tok: int) -> str:
        return self.tokenizer.token_piece(tok).decode("utf-8", errors="replace")

    def take(self, stats: GenerationStats) -> list:
        """The entries of the tokens counted since the last call (an end-of-generation token is not)."""
        entries = (stats.logprobs or [])[self.sent : stats.generated_tokens]
        self.sent += len(entries)
        return entries

    def render(self, entries: list) -> dict:
        if self.chat:

            def one(tok: int, lp: float) -> dict:
                text = self._text(tok)
                return {"token": text, "logprob": lp, "bytes": list(self.tokenizer.token_piece(tok))}

            content = [
                {**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries
            ]
            return {"content": content, "refusal": None}
        tokens = [self._text(e.token) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._text(t): v for t, v in e.top} for e in entries],
            "text_offset": offsets,
        }


def _ids(kind: str) -> tuple[str, str]:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    return rid, "chat.completion" if kind == "chat" else "text_completion"


def completion(api: Any, kind: str, ids: list[int], params: SamplingParams, n: int, plan: Any = None) -> dict:
    """The whole response of a request that is not streamed. RipelmError if generating fails. `plan`: a chat
    request's `openai_chat.ChatPlan` (tool calls, reasoning), one fresh copy per choice."""
    texts: list[list[str]] = [[] for _ in range(n)]
    stats = [GenerationStats() for _ in range(n)]
    for i, ev, st in samples(api, ids, params, n, threading.Event()):
        texts[i].append(ev.text)
        stats[i] = st
    choices = []
    for i in range(n):
        text, finish = "".join(texts[i]), FINISH.get(stats[i].finish_reason, "stop")
        if kind == "chat" and plan is not None:
            mine = replace(plan, calls=[])
            choice: dict[str, Any] = {"index": i, "message": mine.message(text)}
            finish = mine.finish_reason(finish)
        elif kind == "chat":
            choice = {"index": i, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": i, "text": text}
        choice["finish_reason"] = finish
        if params.logprobs is not None:
            lp = _Logprobs(api.backend.tokenizer, kind == "chat")
            choice["logprobs"] = lp.render(lp.take(stats[i]))
        else:
            choice["logprobs"] = None
        choices.append(choice)
    rid, obj = _ids(kind)
    return {"id": rid, "object": obj, "created": int(time.time()), "model": api.model_name,
            "choices": choices, "usage": usage(stats)}  # fmt: skip


def chunks(
    api: Any,
    kind: str,
    ids: list[int],
    params: SamplingParams,
    n: int,
    with_usage: bool,
    cancel: threading.Event,
    plan: Any = None,
) -> Iterator[dict]:
    """The server-sent events of a streamed request, in order (the caller adds `[DONE]`). `plan`: a chat
    request's `openai_chat.ChatPlan`, whose deltas (content, reasoning_content, tool_calls) each choice
    streams through a fresh copy."""
    rid, _ = _ids(kind)
    created, obj = int(time.time()), "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list[dict]) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": api.model_name, "choices": choices}

    def choice(i: int, text: str | dict | None, finish: str | None, logprobs: dict | None = None) -> dict:
        if kind == "chat":  # text: the content, or a whole delta (reasoning_content, tool_calls)
            delta = {} if text is None else text if isinstance(text, dict) else {"content": text}
            c: dict[str, Any] = {"index": i, "delta": delta}
        else:
            c = {"index": i, "text": text or ""}
        c["finish_reason"] = finish
        if logprobs is not None:
            c["logprobs"] = logprobs
        return c

    if kind == "chat":
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(n)])  # fmt: skip
    lps = [_Logprobs(api.backend.tokenizer, kind == "chat") for _ in range(n)]
    final: list[GenerationStats] = [GenerationStats() for _ in range(n)]
    plans = [replace(plan, calls=[]) for _ in range(n)] if kind == "chat" and plan is not None else None
    for i, ev, st in samples(api, ids, params, n, cancel):
        entries = lps[i].take(st) if params.logprobs is not None else None
        rendered = lps[i].render(entries) if entries is not None else None
        deltas: list = plans[i].feed(ev.text, ev.done) if plans is not None else [ev.text] if ev.text else []
        if entries and not deltas:
            deltas = [""]
        for j, d in enumerate(deltas):
            yield chunk([choice(i, d, None, rendered if j == 0 else None)])
        if ev.done and ev.stats is not None:
            final[i] = ev.stats
            finish = FINISH.get(ev.stats.finish_reason, "stop")
            yield chunk([choice(i, None, plans[i].finish_reason(finish) if plans is not None else finish)])
    if with_usage:
        last = chunk([])
        last["usage"] = usage(final)
        yield last
