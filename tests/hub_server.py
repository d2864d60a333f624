"""A real HTTP server on loopback that speaks the Hugging Face Hub's download protocol, for pull tests.

Two threaded `http.server`s on 127.0.0.1 (different ports, so different origins, as the hub and its
CDN are):

* the "hub" answers ``HEAD/GET /{repo}/resolve/{revision}/{file}`` with a 302 to the CDN and the
  headers huggingface_hub reads (``X-Repo-Commit``, ``X-Linked-Etag`` = the LFS sha256,
  ``X-Linked-Size``), or 404;
* the "hub" also answers the model API, ``GET /api/models/{repo}[/revision/{rev}]`` (with ``?blobs=true``:
  each file's size and LFS sha256), as huggingface_hub's ``model_info`` reads it; a repo in
  ``HubFiles.private`` answers 401 (RepoNotFound) and one in ``HubFiles.gated`` 403 (GatedRepo), on the
  API and on resolve;
* the "CDN" serves the bytes, honouring ``Range: bytes=N-`` with 206 / Content-Range.

Faults are switched on per test through `HubFiles.faults`: serve other bytes than advertised
(corrupt), close the connection after N body bytes while Content-Length promised more (truncate,
for the first K requests or always), hold the connection open after N bytes until released (to
interrupt a client), or hide the size (no X-Linked-Size / Content-Length: body ends at close).
Every request is recorded (method, path, Range header) so tests can check that a resume asked only
for the missing bytes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Faults:
    corrupt: bool = False  # flip a byte in what is served (the advertised sha256 stays the real one)
    truncate_after: int | None = None  # close after this many body bytes...
    truncate_times: int = 1_000_000  # ...on this many GET requests (then serve normally)
    hold_after: int | None = None  # send this many bytes, then wait for `release`
    hide_size: bool = False  # no size headers; the body ends when the connection closes
    advertised_sha256: str | None = None  # override X-Linked-Etag
    ignore_range: bool = False  # answer 200 with the whole file even when asked for a range


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class HubFiles:
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (repo, file) -> bytes
    faults: Faults = field(default_factory=Faults)
    requests: list[Request] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)  # set once a hold has begun
    truncated: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    private: set[str] = field(default_factory=set)  # repos that need a token the client does not have
    gated: set[str] = field(default_factory=set)  # repos whose conditions the client has not accepted

    def sha256(self, repo: str, name: str) -> str:
        return hashlib.sha256(self.files[(repo, name)]).hexdigest()


class LoopbackHub:
    def __init__(self) -> None:
        self.state = HubFiles()
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _make_cdn_handler(self.state))
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _make_hub_handler(self.state, self.cdn_url))
        for s in (self.hub, self.cdn):
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def add(self, repo: str, name: str, data: bytes) -> str:
        self.state.files[(repo, name)] = data
        return self.state.sha256(repo, name)

    def gets(self) -> list[Request]:
        return [r for r in self.state.requests if r.method == "GET" and r.path.startswith("/cdn/")]

    def close(self) -> None:
        self.state.release.set()
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()


def _make_hub_handler(state: HubFiles, cdn_url: str) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _refused(self, repo: str) -> bool:
            if repo in state.private:
                self._error(401, "RepoNotFound")
            elif repo in state.gated:
                self._error(403, "GatedRepo", "Access to model is restricted: you must accept its conditions")
            else:
                return False
            return True

        def _model_api(self, parts: list[str]) -> None:
            # api/models/{owner}/{repo}[/revision/{rev}]
            repo = f"{parts[2]}/{parts[3]}" if len(parts) >= 4 else ""
            if self._refused(repo):
                return
            names = sorted(n for (r, n) in state.files if r == repo)
            if not names:
                return self._not_found("RepoNotFound")
            siblings = []
            for n in names:
                data = state.files[(repo, n)]
                lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                siblings.append({"rfilename": n, "size": len(data), "blobId": "0" * 40, "lfs": lfs})
            body = json.dumps(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": COMMIT,
                    "private": False,
                    "gated": False,
                    "siblings": siblings,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self) -> None:
            state.requests.append(Request(self.command, self.path, self.headers.get("Range")))
            parts = unquote(self.path.split("?", 1)[0]).lstrip("/").split("/")
            if parts[:2] == ["api", "models"] and self.command == "GET":
                return self._model_api(parts)
            if len(parts) >= 2 and self._refused(f"{parts[0]}/{parts[1]}"):
                return
            # {owner}/{repo}/resolve/{revision}/{file}
            if len(parts) != 5 or parts[2] != "resolve":
                return self._not_found("RepoNotFound")
            repo, name = f"{parts[0]}/{parts[1]}", parts[4]
            data = state.files.get((repo, name))
            if data is None:
                return self._not_found("EntryNotFound")
            sha = state.faults.advertised_sha256 or hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{cdn_url}/cdn/{parts[0]}/{parts[1]}/{name}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("ETag", '"0000000000000000000000000000000000000000"')
            if not state.faults.hide_size:
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _not_found(self, code: str) -> None:
            self._error(404, code)

        def _error(self, status: int, code: str, message: str = "") -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            if message:
                self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = _resolve
        do_GET = _resolve

    return Hub


def _make_cdn_handler(state: HubFiles) -> type[BaseHTTPRequestHandler]:
    class Cdn(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append(Request("GET", self.path, rng))
            parts = unquote(self.path).lstrip("/").split("/")  # cdn/{owner}/{repo}/{file}
            data = state.files.get((f"{parts[1]}/{parts[2]}", parts[3])) if len(parts) == 4 else None
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            f = state.faults
            if f.corrupt:
                data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
            start = 0
            if rng and not f.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if f.hide_size:
                self.send_header("Connection", "close")
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with state.lock:
                cut = f.truncate_after is not None and state.truncated < f.truncate_times
                if cut:
                    state.truncated += 1
            if cut:
                self.wfile.write(body[: f.truncate_after])
                self.wfile.flush()
                self.close_connection = True
                return
            if f.hold_after is not None:
                self.wfile.write(body[: f.hold_after])
                self.wfile.flush()
                state.holding.set()
                state.release.wait(timeout=60)
                body = body[f.hold_after :]
            try:
                self.wfile.write(body)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            if f.hide_size:
                self.close_connection = True

    return Cdn
