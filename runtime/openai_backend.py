"""The `openai` engine: generation on any OpenAI-compatible server (vLLM, llama.cpp's server, `ripe serve`,
OpenAI itself), for users who outgrow one machine.

Unlike the local engines it takes chat messages, not token ids (``takes_messages``): the server owns
the tokenizer and applies the chat template. Replies stream as server-sent events through the official
`openai` client (already in ripelm's dependency tree, and the client other tools use, so what works
here works there), and come back as the same `TokenEvent`s and `GenerationStats` the local engines
give, so `ripe run` and `ripe chat` treat every engine alike.

The server also owns the context window. `context_length` is the window the server states in its model
listing (vLLM's and `ripe serve`'s `max_model_len`, or `context_length` as some others name it), None when
it states none. A prompt the server refuses as too long comes back as `ContextOverflowError`, with the
prompt's size and the window where the error gives them, so the app can leave old turns out and retry
(app/remote_fit.py).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ripelm.runtime.backend import Capabilities, GenerationStats, TokenEvent
from ripelm.runtime.errors import BackendError, ContextOverflowError
from ripelm.runtime.sampling import SamplingParams

NO_KEY = "sk-no-key-required"  # the client insists on a key; local servers ignore it


def normalize_base_url(url: str) -> str:
    """``http://host:8080`` -> ``http://host:8080/v1`` (where vLLM and llama.cpp serve the API)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackendError(f"--base-url must be an http(s) URL such as http://127.0.0.1:8080/v1, not '{url}'")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class OpenAIBackend:
    name = "openai"
    caps = Capabilities(takes_messages=True)

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        sampling_extras: bool = True,
        timeout: float = 600.0,
    ):
        import openai

        self.base_url = normalize_base_url(base_url)
        self.sampling_extras = sampling_extras
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or NO_KEY, timeout=timeout, max_retries=1
        )
        listing: list[Any] | None = None
        if model is None:
            listing = self._listing()
            model = self._first_model(listing)
        else:
            try:  # only for the context window: a server without a listing still serves a named model
                listing = self._listing()
            except BackendError:
                listing = None
        self.model = model
        self.context_length: int | None = _context_length(listing or [], model)
        # Prompt tokens per UTF-8 byte of the messages, as this server counts them: measured by the app
        # from replies' usage and overflow errors (app/remote_fit.py); None until then.
        self.tokens_per_byte: float | None = None
        self.device = f"{self.model} at {self.base_url}"

    # ---- errors ------------------------------------------------------------------------------------

    def _error(self, e: Exception) -> BackendError | ContextOverflowError:
        import openai

        where = f"the server at {self.base_url}"
        if isinstance(e, openai.APITimeoutError):
            return BackendError(f"{where} did not answer in time")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            return BackendError(f"cannot reach {where}: {str(cause).strip() or type(cause).__name__}")
        if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
            return BackendError(
                f"{where} refused the API key (HTTP {e.status_code}); pass --api-key or set "
                "RIPELM_OPENAI_API_KEY"
            )
        if isinstance(e, openai.NotFoundError):
            return BackendError(
                f"{where} answered 404 ({_detail(e)}): check the URL (it usually ends in /v1) "
                "and the model name"
            )
        if isinstance(e, openai.APIStatusError):
            overflow = _context_overflow(e)
            if overflow is not None:
                return overflow
            return BackendError(f"{where} answered HTTP {e.status_code}: {_detail(e)}")
        return BackendError(f"{where} failed: {e}")

    def _listing(self) -> list[Any]:
        import openai

        try:
            return list(self.client.models.list())
        except openai.OpenAIError as e:
            raise self._error(e) from e

    def list_models(self, listing: list[Any] | None = None) -> list[str]:
        """The model ids the server lists at /v1/models, less those it marks as embedding models
        (`ripe serve` adds `"kind": "embedding"`; other servers list no kind)."""
        models = self._listing() if listing is None else listing
        return [m.id for m in models if (m.model_extra or {}).get("kind") != "embedding"]

    def _first_model(self, listing: list[Any]) -> str:
        models = self.list_models(listing)
        if not models:
            raise BackendError(f"the server at {self.base_url} lists no models; pass --model")
        return models[0]

    # ---- generation --------------------------------------------------------------------------------

    def _sampling(self, params: SamplingParams) -> tuple[dict[str, Any], dict[str, Any]]:
        kw: dict[str, Any] = {
            "model": self.model,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            kw["seed"] = params.seed
        if params.stop:
            kw["stop"] = list(params.stop)
        extra: dict[str, Any] = {}
        if self.sampling_extras:
            # understood by llama.cpp's server and vLLM; a strict server can be told not to get them
            extra = {"top_k": params.top_k if params.top_k > 0 else -1, "min_p": params.min_p}
            if params.repetition_penalty != 1.0:
                extra["repeat_penalty"] = params.repetition_penalty  # llama.cpp
                extra["repetition_penalty"] = params.repetition_penalty  # vLLM
        return kw, extra

    def stream_chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        calls_out: list[dict[str, str]] | None = None,
    ) -> Iterator[TokenEvent]:
        """Send chat messages; the server applies the model's chat template. With `tools` (OpenAI function
        schemas) the server may answer with tool calls: they are put together from the streamed deltas
        into `calls_out` ({"id", "name", "arguments"}: the arguments as the JSON text the server sent)."""
        kw, extra = self._sampling(params)
        if tools:
            kw["tools"] = tools
            if tool_choice is not None:
                kw["tool_choice"] = tool_choice
        pieces: dict[int, dict[str, str]] = {}

        def text_of(choice: Any) -> str | None:
            for d in getattr(choice.delta, "tool_calls", None) or []:
                call = pieces.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function is not None:
                    name = d.function.name or ""
                    if name != call["name"]:  # llama-cpp-python repeats the whole name in every chunk
                        call["name"] += name
                    call["arguments"] += d.function.arguments or ""
            return choice.delta.content

        for ev in self._stream(
            lambda: self.client.chat.completions.create(messages=messages, extra_body=extra, **kw),
            text_of,
            cancel,
        ):
            if ev.done and calls_out is not None:
                calls_out.extend(
                    {**c, "id": c["id"] or f"call_{i}"} for i, c in sorted(pieces.items()) if c["name"]
                )
            yield ev

    def stream_text(
        self, prompt: str, params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Plain text completion (no chat template), through /v1/completions."""
        kw, extra = self._sampling(params)
        return self._stream(
            lambda: self.client.completions.create(prompt=prompt, extra_body=extra, **kw),
            lambda choice: choice.text,
            cancel,
        )

    def _stream(self, start, text_of, cancel: threading.Event | None) -> Iterator[TokenEvent]:
        import openai

        t0 = time.perf_counter()
        stats = GenerationStats(engine=self.name)
        try:
            response = _start(start, cancel)
        except openai.OpenAIError as e:
            raise self._error(e) from e
        if response is None:  # cancelled before the server answered (it was still reading the prompt)
            stats.finish_reason, stats.total_s = "cancelled", time.perf_counter() - t0
            yield TokenEvent("", done=True, stats=stats)
            return
        t_first = None
        chunks = 0
        finish = ""
        usage = None
        try:
            for chunk in _chunks(response, cancel):
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    text = text_of(choice)
                    if choice.finish_reason:
                        finish = choice.finish_reason
                    if text:
                        if t_first is None:
                            t_first = time.perf_counter()
                        chunks += 1
                        yield TokenEvent(text)
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
        except openai.OpenAIError as e:
            raise self._error(e) from e
        finally:
            if cancel is None:
                response.close()  # a Ctrl-C drops the connection, which stops the server's work
        if not finish and cancel is not None and cancel.is_set():
            finish = "cancelled"  # the stream the cancel closed ended without a finish reason
        end = time.perf_counter()
        stats.generated_tokens = usage.completion_tokens if usage else chunks
        stats.prompt_tokens = usage.prompt_tokens if usage else 0
        stats.finish_reason = finish or "stop"
        stats.total_s = end - t0
        if t_first is not None:
            stats.ttft_s = t_first - t0
            if stats.prompt_tokens:
                stats.prefill_tok_s = stats.prompt_tokens / max(stats.ttft_s, 1e-9)
            if stats.generated_tokens > 1:
                stats.decode_tok_s = (stats.generated_tokens - 1) / max(end - t_first, 1e-9)
        yield TokenEvent("", done=True, stats=stats)

    def close(self) -> None:
        self.client.close()


def _start(start: Any, cancel: threading.Event | None) -> Any:
    """`start()` (the request; it returns when the server sends its first bytes, after its prefill), or None
    as soon as `cancel` is set: the request is left to a thread that drops its connection when it returns."""
    if cancel is None:
        return start()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["response"] = start()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        done.set()
        if cancel.is_set() and "response" in box:
            box["response"].close()

    threading.Thread(target=run, daemon=True).start()
    while not done.wait(0.02):
        if cancel.is_set():
            return None
    if "error" in box:
        raise box["error"]
    return box["response"]


def _chunks(response: Any, cancel: threading.Event | None) -> Iterator[Any]:
    """The chunks of a streaming response; with `cancel`, read by a thread, so a cancel while the server is
    silent (a long prefill) ends the stream at once. That thread drops the connection (which stops the
    server's work) when its read returns; closing it from here would wait for that read."""
    if cancel is None:
        yield from response
        return
    got: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    left = threading.Event()  # the reader is gone (cancelled, or it stopped iterating)

    def pump() -> None:
        try:
            for chunk in response:
                got.put(("chunk", chunk))
                if cancel.is_set() or left.is_set():
                    break
            got.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            got.put(("error", e))
        finally:
            response.close()

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            try:
                kind, item = got.get(timeout=0.02)
            except queue.Empty:
                if cancel.is_set():
                    return
                continue
            if kind == "chunk":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        left.set()


def _context_length(listing: list[Any], model: str) -> int | None:
    """The context window the listing gives for `model`: vLLM's `max_model_len` (which `ripe serve` gives
    too) or a `context_length` field; None if it gives neither. llama.cpp's server lists only the window
    the model was trained with (`meta.n_ctx_train`), which need not be the one it serves, so it is not
    taken: that server's overflow error gives the real one."""
    for m in listing:
        if m.id != model:
            continue
        extra = m.model_extra or {}
        for key in ("max_model_len", "context_length"):
            value = extra.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


# How servers word a prompt that does not fit, and where the numbers are: vLLM and OpenAI ("This model's
# maximum context length is 2048 tokens. However, you requested 2100 tokens (2000 in the messages, 100 in
# the completion)"), `ripe serve` ("the prompt is 5000 tokens but the context window is 4096"), llama.cpp's
# server (type exceed_context_size_error, with n_prompt_tokens and n_ctx fields).
_OVERFLOW_WORDS = re.compile(r"context (length|window|size)|maximum context|too many tokens", re.IGNORECASE)
_WINDOW = re.compile(
    r"(?:maximum context length is|context window is|context size is)\D{0,3}(\d+)", re.IGNORECASE
)
_PROMPT = re.compile(
    r"(\d+) (?:tokens )?in the messages|prompt (?:is|has|of) (\d+) tokens|resulted in (\d+) tokens"
    r"|request has (\d+) input tokens",
    re.IGNORECASE,
)


def _context_overflow(e: Any) -> ContextOverflowError | None:
    """The server's refusal of a prompt as too long for its context window, or None for any other error."""
    if e.status_code not in (400, 413):
        return None
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else {}
    err = err if isinstance(err, dict) else {}
    message = str(err.get("message") or _detail(e))
    marked = err.get("code") == "context_length_exceeded" or err.get("type") == "exceed_context_size_error"
    if not marked and not _OVERFLOW_WORDS.search(message):
        return None

    def number(field: str, pattern: re.Pattern[str]) -> int | None:
        value = err.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        m = pattern.search(message)
        return int(next(g for g in m.groups() if g)) if m else None

    return ContextOverflowError(
        f"the conversation does not fit the server's context window: {message[:200]}",
        prompt_tokens=number("n_prompt_tokens", _PROMPT),
        context_length=number("n_ctx", _WINDOW),
    )


def _detail(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:200]
    return str(getattr(e, "message", "") or e)[:200]
