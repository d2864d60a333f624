"""`ripe serve`: an OpenAI-compatible HTTP API over one local engine.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` (JSON or server-sent
events with `"stream": true`), `POST /v1/embeddings` (with `dimensions`, see `embeddings_api`). Every
request runs in its own thread and becomes a request to the one shared engine, so concurrent clients
are batched and share the prefix cache. A client that goes away mid-stream is noticed at the next
write and its request is cancelled (its KV blocks are freed at the engine's next step). Loopback by
default; `--api-key` requires `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ripelm.embeddings_api import EmbeddingsApi, EmbeddingsError
from ripelm.errors import ApiError
from ripelm.models.errors import RipelmError
from ripelm.openai_chat import plan_chat
from ripelm.openai_choices import choice_options, chunks, completion
from ripelm.openai_fields import check_fields, grammar_from_body, text_parts
from ripelm.runtime.backend import Backend, TokenEvent, prompt_ids, stream
from ripelm.runtime.errors import ContextOverflowError
from ripelm.runtime.sampling import SamplingParams

MAX_BODY = 16 << 20
# Seconds a connection may sit silent (a client that opens a socket and sends nothing would otherwise hold
# its handler thread forever); also bounds a write to a client that stopped reading.
SOCKET_TIMEOUT = 120.0
log = logging.getLogger("ripelm.serve")
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, TimeoutError)


def request_error(e: RipelmError) -> ApiError:
    """A request the engine refuses (prompt too long, empty...), as a 400. A prompt too long for the
    context window says so the way clients look for it: OpenAI's code `context_length_exceeded`, and the
    numbers under the names llama.cpp's server gives them (`n_prompt_tokens`, `n_ctx`), so a client can
    work out how much of a conversation to leave out."""
    if isinstance(e, ContextOverflowError):
        extra: dict[str, Any] = {"code": "context_length_exceeded"}
        if e.prompt_tokens is not None:
            extra["n_prompt_tokens"] = e.prompt_tokens
        if e.context_length is not None:
            extra["n_ctx"] = e.context_length
        return ApiError(400, str(e), extra=extra)
    return ApiError(400, str(e))


def generation_error(e: RipelmError) -> ApiError:
    """An error raised while generating (the KV pool cannot hold the sequence...), as an API error."""
    if isinstance(e, ContextOverflowError):
        return request_error(e)
    return ApiError(500, str(e), "server_error")


def internal_error(e: BaseException, where: str) -> ApiError:
    """An exception that is no RipelmError (a bug, a library's own error) while serving `where`: logged
    with its traceback on the server's stderr, and answered as a 500 (a stream's error event) so that a
    client never takes a cut-off answer for a whole one."""
    log.error("ripe serve: %s failed: %s: %s", where, type(e).__name__, e, exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def sampling_from_body(body: dict[str, Any], context_length: int) -> SamplingParams:
    def num(key: str, default: float, cast=float) -> Any:
        val = body.get(key, default)
        if val is None:
            return default
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ApiError(400, f"'{key}' must be a number")
        return cast(val)

    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = context_length
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError(400, f"'{key}' must be an integer")
    params = SamplingParams(
        temperature=num("temperature", 1.0),
        top_k=num("top_k", 0, int),
        top_p=num("top_p", 1.0),
        min_p=num("min_p", 0.0),
        repetition_penalty=num("repeat_penalty", 1.0),
        seed=None if body.get("seed") is None else num("seed", 0, int),
        max_tokens=max_tokens,
        stop=stop,
    )
    try:
        params.validate()
    except RipelmError as e:
        raise ApiError(400, str(e)) from e
    return params


class Api:
    """The endpoints' logic, independent of the HTTP plumbing."""

    def __init__(
        self, backend: Backend, model_name: str, embeddings: EmbeddingsApi | None = None, model_path=None
    ):
        self.backend = backend
        self.model_name = model_name
        self.model_path: Path | None = model_path  # the served GGUF (Ollama's /api/show and /api/ps)
        self.embeddings = embeddings
        self.created = int(time.time())
        # The engine batches concurrent requests; other backends (llama.cpp) take one at a time.
        self.lock = None if backend.caps.batched else threading.Lock()

    def models(self) -> dict:
        # Every chat model this server can serve, the one it started with first (model_listing.py), then its
        # embedding model, marked as such.
        from ripelm.model_listing import chat_models

        entries = chat_models(self) + (
            [{"id": self.embeddings.name, "kind": "embedding"}] if self.embeddings is not None else []
        )
        return {
            "object": "list",
            "data": [
                {"object": "model", "created": self.created, "owned_by": "ripelm", **e} for e in entries
            ],
        }

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.embeddings is None:
            raise ApiError(404, "this server has no embedding model (start it without --no-embeddings)")
        try:
            return self.embeddings.create(body)
        except EmbeddingsError as e:
            raise ApiError(400, str(e)) from e
        except RipelmError as e:  # the embedding model is missing or cannot be loaded
            raise ApiError(503, f"embeddings are unavailable: {e}", "server_error") from e

    def prepare(self, path: str, body: dict[str, Any]) -> tuple[list[int], SamplingParams, bool, Any]:
        """Token ids, sampling, streaming, and for chat the `ChatPlan` (tools, reasoning: openai_chat.py)."""
        check_fields(body)
        params = sampling_from_body(body, self.backend.context_length)
        params.grammar = grammar_from_body(body)  # checked here: a bad one is a 400 naming its field
        plan = None
        _, params.logprobs = choice_options(path, body, self.backend)  # n and logprobs: openai_choices.py
        if path == "/v1/chat/completions":
            if isinstance(body.get("messages"), list):
                text_parts(body["messages"])  # content parts: text only
            plan = plan_chat(self.backend, body, params)
            ids = prompt_ids(self.backend, plan.prompt, add_bos=False)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string")
            ids = prompt_ids(self.backend, prompt)
        return ids, params, bool(body.get("stream")), plan

    def events(self, ids: list[int], params: SamplingParams, cancel: threading.Event) -> Iterator[TokenEvent]:
        if self.lock is None:
            yield from stream(self.backend, ids, params, cancel)
            return
        with self.lock:
            yield from stream(self.backend, ids, params, cancel)


def make_handler(api: Api, api_key: str | None) -> type[BaseHTTPRequestHandler]:
    from ripelm.model_pool import api_for
    from ripelm.ollama_api import OllamaRoutes  # Ollama's API (/api/*) beside OpenAI's: ollama_api.py
    from ripelm.ollama_http import OllamaHandlerMixin

    class Handler(OllamaHandlerMixin, BaseHTTPRequestHandler):
        ollama_routes = OllamaRoutes(api)
        protocol_version = "HTTP/1.1"
        server_version = "ripe"
        timeout = SOCKET_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:  # quiet; one line per request
            pass

        def _send_json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: ApiError) -> None:
            self._send_json(
                e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status, **e.extra}}
            )

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "").encode("utf-8", "replace")
            return hmac.compare_digest(given, f"Bearer {api_key}".encode())  # no timing side channel

        def do_GET(self) -> None:
            if self._ollama("GET"):
                return
            if not self._authorized():
                return self._error(ApiError(401, "invalid or missing API key", "authentication_error"))
            if self.path.rstrip("/") == "/v1/models":
                return self._send_json(200, api.models())
            if self.path.rstrip("/") == "/health":
                return self._send_json(200, {"status": "ok"})
            self._error(ApiError(404, f"no endpoint {self.path}", "not_found_error"))

        def do_POST(self) -> None:
            if self._ollama("POST"):
                return
            try:
                if not self._authorized():
                    raise ApiError(401, "invalid or missing API key", "authentication_error")
                path = self.path.rstrip("/")
                if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                    raise ApiError(404, f"no endpoint {self.path}", "not_found_error")
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > MAX_BODY:
                    raise ApiError(400 if length <= 0 else 413, "a JSON body is required (at most 16 MB)")
                try:
                    body = json.loads(self.rfile.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ApiError(400, f"the body is not valid JSON: {e}") from e
                if not isinstance(body, dict):
                    raise ApiError(400, "the body must be a JSON object")
                if path == "/v1/embeddings":
                    return self._send_json(200, api.embed(body))
                target = api_for(api, body.get("model"))  # another model of the store: model_pool.py
                ids, params, streaming, plan = target.prepare(path, body)
            except ApiError as e:
                return self._error(e)
            except RipelmError as e:  # prompt too long, empty...
                return self._error(request_error(e))
            except Exception as e:  # a bug: a 500 with a JSON body, logged
                return self._error(internal_error(e, f"POST {self.path}"))
            kind = "chat" if path.endswith("chat/completions") else "text"
            n = body.get("n") or 1  # checked by prepare
            if streaming:
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._stream(kind, ids, params, n, usage, target, plan)
            else:
                self._complete(kind, ids, params, n, target, plan)

        def _complete(self, kind: str, ids: list[int], params: SamplingParams, n: int, api=api, plan=None):
            try:
                response = completion(api, kind, ids, params, n, plan)
            except RipelmError as e:  # nothing was sent yet: the client gets a JSON error, not a reset
                return self._error(generation_error(e))
            except Exception as e:
                return self._error(internal_error(e, f"POST {self.path}"))
            self._send_json(200, response)

        def _stream(self, kind: str, ids: list[int], params: SamplingParams, n: int, usage: bool, api=api,
                    plan=None):  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            cancel = threading.Event()
            events = chunks(api, kind, ids, params, n, usage, cancel, plan)  # openai_choices.py
            path = self.path

            def send(obj: dict | str) -> None:
                data = obj if isinstance(obj, str) else json.dumps(obj)
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()

            try:
                for obj in events:
                    send(obj)
                send("[DONE]")
            except CLIENT_GONE:
                cancel.set()  # the client left: stop generating and free its blocks
            except Exception as e:  # headers are out: end the stream with an error event
                err = generation_error(e) if isinstance(e, RipelmError) else internal_error(e, f"POST {path}")
                try:
                    send({"error": {"message": str(err), "type": err.kind, "code": err.status, **err.extra}})
                    send("[DONE]")
                except CLIENT_GONE:
                    pass
            finally:
                events.close()

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a burst of concurrent clients (64 in the load test) had
    # connections reset before a handler thread could accept them.
    request_queue_size = 128
    daemon_threads = True


class Server:
    """A threading HTTP server around an `Api`; `start()` serves on a background thread (tests, embedding)."""

    def __init__(
        self,
        backend: Backend,
        *,
        host: str,
        port: int,
        api_key: str | None,
        model_name: str,
        embeddings: EmbeddingsApi | None = None,
        model_path: Path | None = None,
        pool: Any = None,
    ):
        from ripelm.model_pool import ModelPool  # every model the Ollama routes serve, by name
        self.api = Api(backend, model_name, embeddings, model_path)
        self.api.pool = pool or ModelPool.fixed(backend, model_name, model_path)  # type: ignore[attr-defined]
        self.httpd = _HTTPServer((host, port), make_handler(self.api, api_key))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ripe-serve", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.api.pool.close()  # type: ignore[attr-defined]
        if self.api.embeddings is not None:
            self.api.embeddings.close()
