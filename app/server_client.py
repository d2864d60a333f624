"""`ripe run`, `ripe chat` and `ripe ask` through a running local `ripe serve`, as Ollama's CLI uses its
server: the model is already loaded, so the answer starts without the cold start of loading it again.

A server is used when one answers on 127.0.0.1:11434 or :8080 (or `$RIPELM_SERVER`), says it is ripe
(`"ripelm"` in /api/version) and uses the same model store as this process (so a name means the same
model on both sides), and nothing asks for the embedded engine: `--no-server` (or
`RIPELM_NO_SERVER=1`), `--engine`, `engine` in config.toml, or a flag only the embedded engine has
(--device, --ctx, --threads, --kv-memory, --draft, --speculate, --raw). Otherwise, or if the server does
not have the model, the embedded engine runs as before.

`ripe run` streams from `/api/chat` with the standard library's http.client and never imports torch (the
first token of a warm server arrives before torch could even be imported); chat and ask use the server's
OpenAI API through `OpenAIBackend` when its store has their model.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
from typing import Any
from urllib.parse import urlsplit

PORTS = (11434, 8080)
PROBE_TIMEOUT = 0.25  # seconds: a loopback connect is refused at once; a server answers in well under this


def store_id() -> str:
    """This process's model store, as an opaque id the server reports too (see /api/version)."""
    from ripelm.models.store import models_dir

    return hashlib.sha256(str(models_dir().resolve()).encode()).hexdigest()[:16]


def _request(base: str, method: str, path: str, body: dict | None = None, timeout: float = PROBE_TIMEOUT):
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("RIPELM_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, json.dumps(body) if body is not None else None, headers)
    return conn, conn.getresponse()


def local_server() -> str | None:
    """The base URL of a running ripe serve on this machine that shares our model store, else None."""
    if os.environ.get("RIPELM_NO_SERVER"):
        return None
    given = os.environ.get("RIPELM_SERVER")
    bases = (
        [given if "://" in given else f"http://{given}"]
        if given
        else [f"http://127.0.0.1:{p}" for p in PORTS]
    )
    for base in bases:
        try:
            conn, r = _request(base, "GET", "/api/version")
            info = json.loads(r.read()) if r.status == 200 else {}
            conn.close()
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and (info.get("ripelm") or {}).get("store") == store_id():
            return base
    return None


EMBEDDED_ONLY = ("device", "ctx", "threads", "kv_memory", "draft", "draft_k")


def wants_embedded(args: argparse.Namespace) -> bool:
    if getattr(args, "no_server", False) or getattr(args, "engine", None) or getattr(args, "raw", False):
        return True
    if getattr(args, "speculate", None) not in (None, "off"):
        return True
    if any(getattr(args, a, None) not in (None, False) for a in EMBEDDED_ONLY):
        return True
    from ripelm.config import load_config

    return load_config().engine is not None


def model_name(args: argparse.Namespace) -> str:
    from ripelm.config import load_config
    from ripelm.models.store import BUNDLED_NAME

    return args.model or load_config().model or BUNDLED_NAME


def run_via_server(args: argparse.Namespace, prompt: str) -> int | None:
    """`ripe run` through a local server: the exit code, or None when there is none to use (or it does not
    have the model) and the embedded engine should run."""
    if wants_embedded(args):
        return None
    base = local_server()
    if base is None:
        return None
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    options: dict[str, Any] = {
        "temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty, "num_predict": args.max_tokens, "stop": list(args.stop),
    }  # fmt: skip
    if args.seed is not None:
        options["seed"] = args.seed
    body = {"model": model_name(args), "messages": messages, "options": options, "stream": True}
    try:
        conn, r = _request(base, "POST", "/api/chat", body, timeout=600)
    except OSError:
        return None
    if r.status == 404:  # the server does not have this model: run it here
        conn.close()
        return None
    if r.status != 200:
        from ripelm.models.errors import RipelmError

        msg = (json.loads(r.read() or b"{}") or {}).get("error", r.reason)
        conn.close()
        raise RipelmError(f"the server at {base}: {msg}")
    last: dict[str, Any] = {}
    out = sys.stdout
    for raw in r:
        line = json.loads(raw)
        if line.get("error"):
            from ripelm.models.errors import RipelmError

            raise RipelmError(f"the server at {base}: {line['error']}")
        text = (line.get("message") or {}).get("content", "")
        if text:
            out.write(text)
            out.flush()
        last = line
    conn.close()
    out.write("\n")
    out.flush()
    if args.stats:
        ttft = last.get("prompt_eval_duration", 0) / 1e6
        n, dur = last.get("eval_count", 0), last.get("eval_duration", 0) / 1e9
        speed = n / dur if dur > 0 else 0.0
        print(
            f"engine server {base} ({last.get('model')}) | prompt {last.get('prompt_eval_count', 0)} tok | "
            f"generated {n} tok | ttft {ttft:.0f} ms | decode {speed:.1f} tok/s",
            file=sys.stderr,
        )
    return 0


def openai_backend_via_server(args: argparse.Namespace):
    """`ripe chat` / `ripe ask`: an OpenAIBackend on a local server serving the model, else None."""
    if wants_embedded(args):
        return None
    base = local_server()
    if base is None:
        return None
    name = model_name(args)
    try:  # the server serves every model of its store by name (loading it if need be)
        conn, r = _request(base, "POST", "/api/show", {"model": name})
        r.read()
        conn.close()
    except OSError:
        return None
    if r.status != 200:
        return None
    from ripelm.runtime.openai_backend import OpenAIBackend

    return OpenAIBackend(f"{base}/v1", api_key=os.environ.get("RIPELM_API_KEY"), model=name)
