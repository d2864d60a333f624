"""HTTP plumbing of Ollama's routes in `ripe serve`: JSON bodies, Ollama's `{"error": ...}` replies,
newline-delimited JSON streams, and the request-handler mixin that sends /api/* (and /) to `OllamaRoutes`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

from ripelm.models.errors import RipelmError
from ripelm.server import MAX_BODY, ApiError, generation_error, internal_error


def read_body(h: BaseHTTPRequestHandler) -> dict[str, Any]:
    length = int(h.headers.get("Content-Length") or 0)
    if length > MAX_BODY:
        raise ApiError(413, "the body is over 16 MB")
    try:
        body = json.loads(h.rfile.read(length)) if length > 0 else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def send_json(h: BaseHTTPRequestHandler, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json; charset=utf-8")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def send_text(h: BaseHTTPRequestHandler, status: int, text: str, head: bool = False) -> None:
    data = text.encode()
    h.send_response(status)
    h.send_header("Content-Type", "text/plain; charset=utf-8")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if not head:
        h.wfile.write(data)


def send_ndjson(h: BaseHTTPRequestHandler, lines: Iterator[dict]) -> None:
    """NDJSON: the first line is computed before the headers go out, so that a request refused at
    its start (unknown model, bad option) is still an HTTP error status."""
    first = next(lines, None)
    h.send_response(200)
    h.send_header("Content-Type", "application/x-ndjson")
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    try:
        if first is not None:
            h.wfile.write(json.dumps(first).encode() + b"\n")
            h.wfile.flush()
        for line in lines:
            h.wfile.write(json.dumps(line).encode() + b"\n")
            h.wfile.flush()
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the client left; closing `lines` cancels its generation
    except Exception as e:  # headers are out: Ollama's error line ends the stream
        if isinstance(e, ApiError):
            err = e
        elif isinstance(e, RipelmError):
            err = generation_error(e)
        else:
            err = internal_error(e, f"POST {h.path}")
        try:
            h.wfile.write(json.dumps({"error": str(err)}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
    finally:
        close = getattr(lines, "close", None)
        if close is not None:
            close()


class OllamaHandlerMixin:
    """Mixed into the server's request handler: routes Ollama's paths (after the same API-key check as
    the OpenAI routes) and adds the HEAD and DELETE methods they use. `ollama_routes` is set by the
    server."""

    ollama_routes: Any = None

    def _ollama(self, method: str) -> bool:
        h: Any = self
        if self.ollama_routes is None or not self.ollama_routes.handles(h.path.split("?", 1)[0]):
            return False
        if not h._authorized():
            send_json(h, 401, {"error": "invalid or missing API key"})
        else:
            self.ollama_routes.handle(h, method)
        return True

    def do_HEAD(self) -> None:
        if not self._ollama("HEAD"):
            send_json(self, 404, {"error": "not found"})  # type: ignore[arg-type]

    def do_DELETE(self) -> None:
        if not self._ollama("DELETE"):
            send_json(self, 404, {"error": "not found"})  # type: ignore[arg-type]
