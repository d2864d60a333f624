"""`ripe ps` and `ripe stop NAME`: ask a running `ripe serve` which models it holds, or to unload one.

They speak the server's Ollama API (`GET /api/ps`; `POST /api/generate` with an empty prompt and
`keep_alive: 0`, as Ollama's own CLI stops a model), so they work against Ollama too. The server is
`--server URL`, else `$RIPELM_SERVER`, else the first of 127.0.0.1:11434 (`ripe serve --ollama`) and
127.0.0.1:8080 (`ripe serve`) that answers.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from typing import Any

from ripelm.models.errors import RipelmError

DEFAULT_SERVERS = ("http://127.0.0.1:11434", "http://127.0.0.1:8080")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ps = sub.add_parser(
        "ps",
        help="list the models a running `ripe serve` holds",
        description="The models a running `ripe serve` has loaded: size, where they run, and when an idle "
        "one will be unloaded (its keep-alive).",
    )
    stop = sub.add_parser(
        "stop",
        help="unload a model from a running `ripe serve`",
        description="Unload NAME from a running `ripe serve` now (at the end of its running requests).",
    )
    stop.add_argument("name", help="the model's name, as `ripe ps` shows it")
    for p in (ps, stop):
        p.add_argument(
            "--server",
            default=None,
            metavar="URL",
            help="the server (default: $RIPELM_SERVER, else 127.0.0.1:11434, then 127.0.0.1:8080)",
        )


def _call(base: str, method: str, path: str, body: dict | None = None, timeout: float = 600) -> Any:
    import urllib.error  # here: every `ripe` command builds this parser; only these commands call a server
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base.rstrip("/") + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    key = os.environ.get("RIPELM_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error") or e.reason
        except (ValueError, AttributeError):
            msg = e.reason
        raise RipelmError(f"the server at {base} answered {e.code}: {msg}") from None


def find_server(given: str | None) -> str | None:
    """The first server that answers `GET /api/version`, or None."""
    candidates = (
        [given] if given else [os.environ["RIPELM_SERVER"]] if os.environ.get("RIPELM_SERVER") else []
    )
    for base in candidates or DEFAULT_SERVERS:
        base = base if "://" in base else f"http://{base}"
        try:
            _call(base, "GET", "/api/version", timeout=2)
            return base
        except (OSError, RipelmError, ValueError):
            continue
    return None


def _server(given: str | None) -> str:
    base = find_server(given)
    if base is None:
        where = given or os.environ.get("RIPELM_SERVER") or " or ".join(DEFAULT_SERVERS)
        raise RipelmError(f"no ripe serve is running at {where} (start one with `ripe serve --ollama`)")
    return base


def _until(iso: str) -> str:
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if when.year >= 9999:
        return "Forever"
    left = (when - datetime.now(UTC)).total_seconds()
    if left < 1:
        return "now"
    return f"{int(left)} seconds from now" if left < 120 else f"{int(left // 60)} minutes from now"


def cmd_ps(args: argparse.Namespace) -> int:
    from ripelm.models.blobstore import human_size

    models = _call(_server(args.server), "GET", "/api/ps").get("models", [])
    rows = [("NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    for m in models:
        where = "GPU" if m.get("size_vram") else "CPU"
        rows.append(
            (
                m["name"],
                human_size(m.get("size", 0)),
                where,
                str(m.get("context_length", "")),
                _until(m["expires_at"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    base = _server(args.server)
    loaded = [m["name"] for m in _call(base, "GET", "/api/ps").get("models", [])]
    if args.name not in loaded and f"{args.name}:latest" not in loaded:
        raise RipelmError(f"'{args.name}' is not loaded (loaded: {', '.join(loaded) or 'none'})")
    _call(base, "POST", "/api/generate", {"model": args.name, "keep_alive": 0})
    print(f"stopped {args.name}")
    return 0
