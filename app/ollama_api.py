"""Ollama's HTTP API beside the OpenAI one in `ripe serve`, for the tools that speak only Ollama's (oterm,
Open WebUI, Continue, n8n, the `ollama` Python client).

Generation: `/api/chat` and `/api/generate` (newline-delimited JSON when `stream` is true, Ollama's
default; one JSON object otherwise), `/api/embed` (and the older `/api/embeddings`). Models:
`/api/tags`, `/api/show`, `/api/ps`, `/api/pull`, `/api/delete`, `/api/copy` (in `ollama_models`), and
`/api/version`. Errors are Ollama's `{"error": "..."}` with a 4xx/5xx status; after a stream began, an
error is the stream's last line.

`options` map onto our `SamplingParams` (temperature, top_k, top_p, min_p, repeat_penalty,
repeat_last_n, seed, num_predict, stop). Options that tune the server's own resources (num_ctx,
num_thread, num_gpu, num_batch, use_mmap...) are accepted and ignored: one server shares one engine
between its clients, so a request does not resize it. Sampling options we do not implement (mirostat,
tfs_z, typical_p, presence/frequency penalties) are accepted only at their neutral value, and any other
name is a 400 that names the field, as is `format` until structured output lands. `think` renders the
template's thinking switch where the model has one (and splits `<think>...</think>` into `thinking`);
asking a model without one to think is a 400.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

from ripelm import ollama_models as om
from ripelm.models.errors import RipelmError
from ripelm.ollama_http import read_body, send_json, send_ndjson, send_text
from ripelm.ollama_params import (
    IGNORED_OPTIONS,
    ThinkSplitter,
    collect,
    collect_last,
    parse_keep_alive,
    sampling_from_options,
    timings,
)
from ripelm.runtime.backend import GenerationStats, prompt_ids
from ripelm.runtime.sampling import SamplingParams
from ripelm.server import Api, ApiError, request_error

# The Ollama API version we answer at /api/version: clients gate features on it (Open WebUI, Continue),
# and what is served here matches Ollama's API of that release for the routes listed above.
OLLAMA_VERSION = "0.12.0"
FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model that stays loaded while the server runs


class OllamaRoutes:
    """Ollama's routes over an `Api` (the served model, its backend and embedder)."""

    def __init__(self, api: Api):
        self.api = api

    # ---- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith("/api/") or path in ("", "/")

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "":
                return send_text(h, 200, "Ollama is running", head=method == "HEAD")
            gets = {"/api/version": self.version, "/api/tags": self.tags, "/api/ps": self.ps}
            if path in gets and method in ("GET", "HEAD"):
                return send_json(h, 200, gets[path]())
            posts = {
                "/api/chat": self.chat, "/api/generate": self.generate, "/api/embed": self.embed,
                "/api/embeddings": self.embeddings, "/api/show": self.show, "/api/pull": self.pull,
                "/api/copy": self.copy, "/api/delete": self.delete,
            }  # fmt: skip
            if path not in posts or (method != "POST" and not (path == "/api/delete" and method == "DELETE")):
                raise ApiError(404, f"no endpoint {method} {path}")
            body = read_body(h)
            result = posts[path](body)
            if isinstance(result, Iterator):
                return send_ndjson(h, result)
            send_json(h, 200, result)
        except ApiError as e:
            send_json(h, e.status, {"error": str(e)})
        except om.NotFound as e:
            send_json(h, 404, {"error": str(e)})
        except RipelmError as e:
            err = request_error(e)
            send_json(h, err.status, {"error": str(err)})

    # ---- models --------------------------------------------------------------------------------

    def _served(self, body: dict[str, Any], key: str = "model") -> str:
        name = body.get(key) or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"'{key}' is required")
        from ripelm.models.store import _canonical

        if _canonical(name) != _canonical(self.api.model_name) and name != self.api.model_name:
            raise om.NotFound(f'model "{name}" not found (this server runs {self.api.model_name})')
        return self.api.model_name

    def version(self) -> dict[str, Any]:
        return {"version": OLLAMA_VERSION}

    def tags(self) -> dict[str, Any]:
        path = self.api.model_path
        return om.tags([(self.api.model_name, path)] if path is not None else [])

    def show(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required")
        if name == self.api.model_name and self.api.model_path is not None:
            return om.show(name, self.api.model_path)
        return om.show(name)

    def ps(self) -> dict[str, Any]:
        path = self.api.model_path
        backend = self.api.backend
        entry: dict[str, Any] = {
            "name": self.api.model_name,
            "model": self.api.model_name,
            "size": path.stat().st_size if path is not None else 0,
            "digest": om.file_digest(path) if path is not None else "",
            "details": om.model_info(path)["details"] if path is not None else {"format": "gguf"},
            "expires_at": FOREVER,
            "context_length": backend.context_length,
        }
        entry["size_vram"] = entry["size"] if backend.device not in ("cpu", "") else 0
        return {"models": [entry]}

    def delete(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required")
        om.delete(name)
        return {}

    def copy(self, body: dict[str, Any]) -> dict[str, Any]:
        src, dst = body.get("source"), body.get("destination")
        if not isinstance(src, str) or not src:
            raise ApiError(400, "'source' is required")
        if not isinstance(dst, str) or not dst:
            raise ApiError(400, "'destination' is required")
        om.copy(src, dst)
        return {}

    def pull(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required")
        lines = om.pull_progress(name)
        if body.get("stream", True):
            return lines
        return collect_last(lines)

    # ---- generation ----------------------------------------------------------------------------

    def _check_common(self, body: dict[str, Any]) -> None:
        fmt = body.get("format")
        if fmt not in (None, ""):
            raise ApiError(400, "'format' is not supported yet (structured output)")
        if body.get("keep_alive") is not None:
            parse_keep_alive(body["keep_alive"])
        if body.get("tools"):
            raise ApiError(400, "'tools' is not supported yet")

    def _think(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Template variables for `think`, and whether the output is to be split into thinking."""
        think = body.get("think")
        can = om.thinks(self.api.backend.template.source)
        if think in (None, False, ""):
            return ({"enable_thinking": False} if think is False and can else {}), can and think is None
        if not can:
            raise ApiError(400, f"'think': {self.api.model_name} does not support thinking")
        return {"enable_thinking": True}, True

    def chat(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        model = self._served(body)
        self._check_common(body)
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise ApiError(400, "'messages' must be a list")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "every message needs a 'role' and a 'content'")
            if m.get("images"):
                raise ApiError(400, "'messages.images' is not supported (no vision models)")
            content = m.get("content") or ""
            if not isinstance(content, str):
                raise ApiError(400, "'messages.content' must be a string")
            clean.append({"role": m["role"], "content": content})
        if not clean:  # Ollama: an empty chat loads the model
            return {**self._stamp(model), "message": {"role": "assistant", "content": ""}, "done": True,
                    "done_reason": "load"}  # fmt: skip
        params = sampling_from_options(body.get("options"), self.api.backend.context_length)
        variables, split = self._think(body)
        text = self.api.backend.template.render(clean, add_generation_prompt=True, **variables)
        ids = prompt_ids(self.api.backend, text, add_bos=False)
        lines = self._generate_lines(model, ids, params, split, chat=True)
        return lines if body.get("stream", True) else collect(lines, chat=True)

    def generate(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        model = self._served(body)
        self._check_common(body)
        for key in ("images", "suffix", "template"):
            if body.get(key):
                raise ApiError(400, f"'{key}' is not supported")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string")
        if not prompt:  # Ollama: an empty prompt loads (or with keep_alive 0, unloads) the model
            unload = body.get("keep_alive") is not None and parse_keep_alive(body["keep_alive"]) == 0
            return {**self._stamp(model), "response": "", "done": True,
                    "done_reason": "unload" if unload else "load"}  # fmt: skip
        params = sampling_from_options(body.get("options"), self.api.backend.context_length)
        context = body.get("context") or []
        if not isinstance(context, list) or not all(isinstance(t, int) for t in context):
            raise ApiError(400, "'context' must be a list of token ids")
        variables, split = self._think(body)
        if body.get("raw"):
            ids = prompt_ids(self.api.backend, prompt)
        else:
            system = body.get("system")
            msgs = ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + [
                {"role": "user", "content": prompt}
            ]
            text = self.api.backend.template.render(msgs, add_generation_prompt=True, **variables)
            ids = prompt_ids(self.api.backend, text, add_bos=False)
        lines = self._generate_lines(model, list(context) + ids, params, split, chat=False)
        return lines if body.get("stream", True) else collect(lines, chat=False)

    def _stamp(self, model: str) -> dict[str, Any]:
        return {"model": model, "created_at": om.rfc3339()}

    def _generate_lines(
        self, model: str, ids: list[int], params: SamplingParams, split: bool, *, chat: bool
    ) -> Iterator[dict[str, Any]]:
        started = time.perf_counter()
        cancel = threading.Event()
        splitter = ThinkSplitter() if split else None
        generated: list[int] = []

        def line(thinking: str, content: str) -> dict[str, Any]:
            out = {**self._stamp(model), "done": False}
            if chat:
                out["message"] = {"role": "assistant", "content": content}
                if thinking:
                    out["message"]["thinking"] = thinking
            else:
                out["response"] = content
                if thinking:
                    out["thinking"] = thinking
            return out

        events = self.api.events(ids, params, cancel)
        try:
            for ev in events:
                if ev.token_id is not None:
                    generated.append(ev.token_id)
                if ev.text:
                    thinking, content = splitter.feed(ev.text) if splitter else ("", ev.text)
                    if thinking or content:
                        yield line(thinking, content)
                if ev.done:
                    if splitter is not None:
                        thinking, content = splitter.flush()
                        if thinking or content:
                            yield line(thinking, content)
                    last = line("", "")
                    last["done"] = True
                    last.update(timings(ev.stats or GenerationStats(), started))
                    if not chat:
                        last["context"] = ids + generated
                    yield last
        except GeneratorExit:
            cancel.set()  # the client went away: stop generating and free its blocks
            raise
        finally:
            events.close()  # type: ignore[attr-defined]

    # ---- embeddings ----------------------------------------------------------------------------

    def _embed(self, body: dict[str, Any], inputs: Any) -> tuple[list[list[float]], int, float]:
        emb = self.api.embeddings
        if emb is None:
            raise ApiError(400, "this server has no embedding model (start it without --no-embeddings)")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required")
        from ripelm.models.store import _canonical

        if _canonical(name) != _canonical(emb.name) and name != emb.name:
            raise ApiError(400, f"'model': {name} does not support embeddings (this server's is {emb.name})")
        for key in body.get("options") or {}:
            if key not in IGNORED_OPTIONS:
                raise ApiError(400, f"'options.{key}' is not supported for embeddings")
        started = time.perf_counter()
        req: dict[str, Any] = {"input": inputs, "encoding_format": "float"}
        if body.get("dimensions") is not None:
            req["dimensions"] = body["dimensions"]
        out = self.api.embed(req)
        vectors = [d["embedding"] for d in out["data"]]
        return vectors, out["usage"]["prompt_tokens"], time.perf_counter() - started

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        vectors, used, took = self._embed(body, body.get("input"))
        return {
            "model": self.api.embeddings.name,  # type: ignore[union-attr]
            "embeddings": vectors,
            "total_duration": int(took * 1e9),
            "load_duration": 0,
            "prompt_eval_count": used,
        }

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string")
        vectors, _, _ = self._embed(body, prompt)
        return {"embedding": vectors[0]}
