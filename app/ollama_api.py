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
name is a 400 that names the field. `format` ("json" or a JSON schema) is the same grammar-constrained
sampling as OpenAI's `response_format` (`ollama_params.grammar_from_format`). `think` renders the
template's thinking switch where the model has one (and splits `<think>...</think>` into `thinking`);
asking a model without one to think is a 400.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

from ripelm import ollama_models as om
from ripelm.model_pool import UNSET, Loaded, ModelPool, PoolFullError
from ripelm.models.errors import RipelmError
from ripelm.ollama_http import read_body, send_json, send_ndjson, send_text
from ripelm.ollama_params import (
    IGNORED_OPTIONS,
    ThinkSplitter,
    collect,
    collect_last,
    grammar_from_format,
    parse_keep_alive,
    sampling_from_options,
    timings,
)
from ripelm.runtime.backend import GenerationStats, prompt_ids, stream
from ripelm.runtime.sampling import SamplingParams
from ripelm.server import CLIENT_GONE, Api, ApiError, internal_error, request_error

# The Ollama API version we answer at /api/version: clients gate features on it (Open WebUI, Continue),
# and what is served here matches Ollama's API of that release for the routes listed above.
OLLAMA_VERSION = "0.12.0"
FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model that stays loaded while the server runs


class OllamaRoutes:
    """Ollama's routes over an `Api` (the served model, its backend and embedder)."""

    def __init__(self, api: Api):
        self.api = api

    @property
    def pool(self) -> ModelPool:
        return self.api.pool  # type: ignore[attr-defined]

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
        except PoolFullError as e:
            send_json(h, 503, {"error": str(e)})
        except RipelmError as e:
            err = request_error(e)
            send_json(h, err.status, {"error": str(err)})
        except CLIENT_GONE:
            pass
        except Exception as e:  # a bug: a 500 with Ollama's error body, logged
            send_json(h, 500, {"error": str(internal_error(e, f"{method} {path}"))})

    # ---- models --------------------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        from ripelm.server_client import store_id

        # `ripelm.store`: lets `ripe run` on this machine tell a ripe server on its own store (server_client)
        return {"version": OLLAMA_VERSION, "ripelm": {"store": store_id()}}

    def tags(self) -> dict[str, Any]:
        return om.tags([(m.name, m.path) for m in self.pool.loaded() if m.path is not None])

    def show(self, body: dict[str, Any]) -> dict[str, Any]:
        name = self._model_name(body)
        for m in self.pool.loaded():
            if m.name == name and m.path is not None:
                return om.show(name, m.path)
        return om.show(name)

    def ps(self) -> dict[str, Any]:
        out = []
        for m in self.pool.loaded():
            info = om.model_info(m.path) if m.path is not None else None
            until = m.expires_at()
            entry: dict[str, Any] = {
                "name": m.name,
                "model": m.name,
                "size": m.size,
                "digest": om.file_digest(m.path) if m.path is not None else "",
                "details": info["details"] if info else {"format": "gguf"},
                "expires_at": FOREVER if until is None else om.rfc3339(until),
                "context_length": m.backend.context_length,
            }
            entry["size_vram"] = m.size if m.backend.device not in ("cpu", "") else 0
            out.append(entry)
        return {"models": out}

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

    def _model_name(self, body: dict[str, Any]) -> str:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required")
        return name

    def _common(self, body: dict[str, Any]) -> Any:
        """Checks shared by chat and generate; returns the request's keep-alive (or UNSET)."""
        if body.get("tools"):
            raise ApiError(400, "'tools' is not supported yet")
        keep = body.get("keep_alive")
        return UNSET if keep is None else parse_keep_alive(keep)

    @staticmethod
    def _think(body: dict[str, Any], m: Loaded) -> tuple[dict[str, Any], bool]:
        """Template variables for `think`, and whether the output is to be split into thinking."""
        think = body.get("think")
        can = om.thinks(m.backend.template.source)
        if think in (None, False, ""):
            return ({"enable_thinking": False} if think is False and can else {}), can and think is None
        if not can:
            raise ApiError(400, f"'think': {m.name} does not support thinking")
        return {"enable_thinking": True}, True

    def chat(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        name = self._model_name(body)
        keep = self._common(body)
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
        if not clean:  # Ollama: an empty chat loads the model (or, with keep_alive 0, unloads it)
            return self._load_or_unload(name, keep, chat=True)

        def build(m: Loaded) -> tuple[list[int], dict[str, Any], bool]:
            variables, split = self._think(body, m)
            text = m.backend.template.render(clean, add_generation_prompt=True, **variables)
            return prompt_ids(m.backend, text, add_bos=False), {"grammar": grammar}, split

        grammar = grammar_from_format(body.get("format"))
        lines = self._run(name, keep, body.get("options"), build, chat=True)
        return lines if body.get("stream", True) else collect(lines, chat=True)

    def generate(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        name = self._model_name(body)
        keep = self._common(body)
        for key in ("images", "suffix", "template"):
            if body.get(key):
                raise ApiError(400, f"'{key}' is not supported")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string")
        if not prompt:  # Ollama: an empty prompt loads the model (or, with keep_alive 0, unloads it)
            return self._load_or_unload(name, keep, chat=False)
        context = body.get("context") or []
        if not isinstance(context, list) or not all(isinstance(t, int) for t in context):
            raise ApiError(400, "'context' must be a list of token ids")
        system = body.get("system")

        def build(m: Loaded) -> tuple[list[int], dict[str, Any], bool]:
            variables, split = self._think(body, m)
            if body.get("raw"):
                ids = list(context) + prompt_ids(m.backend, prompt)
                return ids, {"context": True, "grammar": grammar}, split
            msgs = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
            msgs.append({"role": "user", "content": prompt})
            text = m.backend.template.render(msgs, add_generation_prompt=True, **variables)
            ids = list(context) + prompt_ids(m.backend, text, add_bos=False)
            return ids, {"context": True, "grammar": grammar}, split

        grammar = grammar_from_format(body.get("format"))
        lines = self._run(name, keep, body.get("options"), build, chat=False)
        return lines if body.get("stream", True) else collect(lines, chat=False)

    def _load_or_unload(self, name: str, keep: Any, *, chat: bool) -> dict[str, Any]:
        canonical, _ = self.pool.resolve(name)
        if keep == 0:
            self.pool.unload(canonical)
            reason = "unload"
        else:
            self.pool.load(canonical, keep)
            reason = "load"
        out = {"model": canonical, "created_at": om.rfc3339(), "done": True, "done_reason": reason}
        out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        return out

    def _run(self, name: str, keep: Any, options: Any, build: Callable, *, chat: bool) -> Iterator[dict]:
        """The generation's lines. Nothing happens until the first line is asked for: the model is held
        from then until the generator ends (or is closed: the client left), so a stream never started
        holds nothing."""
        self.pool.resolve(name)  # an unknown model is a 404 now, before any stream
        with self.pool.use(name, keep) as m:
            started = time.perf_counter()
            params = sampling_from_options(options, m.backend.context_length)
            ids, extra, split = build(m)
            params.grammar = extra.get("grammar")  # `format`
            yield from self._lines(m, ids, params, split, chat, started, bool(extra.get("context")))

    def _lines(
        self, m: Loaded, ids: list[int], params: SamplingParams, split: bool, chat: bool, started: float,
        with_context: bool,
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        cancel = threading.Event()
        splitter = ThinkSplitter() if split else None
        generated: list[int] = []

        def line(thinking: str, content: str) -> dict[str, Any]:
            out: dict[str, Any] = {"model": m.name, "created_at": om.rfc3339(), "done": False}
            key = "content" if chat else "response"
            part = {"role": "assistant", key: content} if chat else {key: content}
            if thinking:
                part["thinking"] = thinking
            out.update({"message": part} if chat else part)
            return out

        lock = m.lock or contextlib.nullcontext()
        with lock:
            events = stream(m.backend, ids, params, cancel)
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
                        if with_context:
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
