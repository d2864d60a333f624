"""`ripe serve`: flags, model loading and the foreground server loop."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ripelm.models.errors import RipelmError

DEFAULT_MODEL_NAME = "smollm2:135m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model at /v1/chat/completions, /v1/completions and /v1/models (streaming "
        "with server-sent events), and an embedding model at /v1/embeddings (with `dimensions`). "
        "Ollama's API is served beside it (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, "
        "/api/embed, /api/pull, /api/delete, /api/copy), for clients such as oterm and Open WebUI. "
        "Concurrent requests are batched by the native engine. Listens on "
        "127.0.0.1 unless --host says otherwise.",
        epilog="Examples:\n  ripe serve --port 8080\n  curl http://127.0.0.1:8080/v1/models\n"
        "  ripe serve --ollama\n  curl http://127.0.0.1:11434/api/tags",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", "-m", default=None, help="model name or .gguf path (default: the bundled model)"
    )
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "native", "llama.cpp"],
        help="local engine (default auto)",
    )
    p.add_argument(
        "--device", default=None, choices=["auto", "cpu", "cuda", "mps"], help="native engine device"
    )
    p.add_argument(
        "--ctx", type=int, default=None, metavar="N", help="context window in tokens (default 4096)"
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--kv-memory", default=None, metavar="SIZE", help="paged KV cache memory, e.g. 1G")
    p.add_argument(
        "--speculate",
        default=None,
        choices=["auto", "draft", "ngram", "off"],
        help="speculative decoding in the native engine for every request: ngram is prompt lookup, draft "
        "the --draft model (batched across requests in the engine), auto the draft with --draft else "
        "prompt lookup; adaptive, same output; off: plain decoding (default off, auto with --draft). Usage "
        "reports accepted and rejected proposals under completion_tokens_details.",
    )
    p.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="draft model for speculative decoding (name or .gguf sharing the model's vocabulary; 'auto': "
        "the catalog's pairing, else a Q4_1 copy of the model made once)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="port to listen on (default 8080, or 11434 with --ollama; 0 picks a free one)",
    )
    p.add_argument(
        "--ollama",
        action="store_true",
        help="listen on Ollama's port, 11434, by default (Ollama's API at /api/* is served either way)",
    )
    p.add_argument(
        "--embedder",
        default=None,
        metavar="NAME",
        help="embedding model for /v1/embeddings: a name (`ripe collections embedders` lists them), a file "
        "in the store or a .gguf path (default: the bundled all-minilm:l6-v2, loaded on first use)",
    )
    p.add_argument(
        "--keep-alive",
        default="5m",
        metavar="DURATION",
        help="how long a model loaded on demand (another model of the store, asked for by name) stays "
        "loaded when idle, e.g. 30s, 5m, 1h, -1 for ever (default 5m; a request's keep_alive overrides it). "
        "The model served at start stays until `ripe stop`.",
    )
    p.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="memory for loaded models (weights and K/V cache), e.g. 8G: idle models are unloaded, oldest "
        "first, to make room (default: three quarters of the memory available at start)",
    )
    p.add_argument("--no-embeddings", action="store_true", help="do not serve /v1/embeddings")
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require clients to send 'Authorization: Bearer KEY' (default: $RIPELM_API_KEY, else none)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _served_name(spec: str) -> str:
    """The name a model is served under: its store name (`smollm2` -> `smollm2:135m`), else what was given."""
    from ripelm.ollama_models import NotFound, find

    try:
        return find(spec)[0]
    except (NotFound, RipelmError):
        return spec


def _resolver(name: str):
    """A name asked for by a client -> (store name, file); a .gguf path serves as itself."""
    from pathlib import Path

    from ripelm.ollama_models import NotFound, find

    try:
        found, path, _ = find(name)
        return found, path
    except NotFound:
        if name.endswith(".gguf") and Path(name).expanduser().is_file():
            return name, Path(name).expanduser()
        raise


def cmd_serve(args: argparse.Namespace) -> int:
    from ripelm.commands import _notice
    from ripelm.embeddings_api import EmbeddingsApi
    from ripelm.models.store import resolve_model
    from ripelm.runtime.engines import open_backend
    from ripelm.runtime.kv_cache import parse_memory
    from ripelm.server import Server

    if args.port is None:
        args.port = 11434 if args.ollama else 8080
    if not 0 <= args.port <= 65535:
        raise RipelmError(f"--port must be between 0 and 65535, not {args.port}")
    api_key = args.api_key or os.environ.get("RIPELM_API_KEY") or None
    path = resolve_model(args.model)
    kv = parse_memory(args.kv_memory) if args.kv_memory else None
    if args.draft and args.speculate in ("ngram", "off"):
        raise RipelmError(f"--speculate {args.speculate} and --draft contradict each other")
    if not args.draft and args.speculate == "draft":
        raise RipelmError("--speculate draft needs --draft MODEL (or --draft auto)")
    # auto: prompt lookup where the native engine runs (llama.cpp, asked for by name, cannot speculate)
    lookup = args.speculate == "ngram" or (args.speculate == "auto" and args.engine != "llama.cpp")
    from ripelm.model_pool import ModelPool, PooledBackend
    from ripelm.ollama_params import parse_keep_alive

    try:
        keep_alive = parse_keep_alive(args.keep_alive)
    except Exception as e:
        raise RipelmError(f"--keep-alive: {e}") from e
    budget = parse_memory(args.memory_budget) if args.memory_budget else None
    if budget is None:
        import psutil

        budget = int(psutil.virtual_memory().available * 0.75)

    def opener(model_path):
        if args.draft and Path(model_path) == Path(path):  # the draft pairs with the model named at start
            from ripelm.runtime.draft_pairing import open_with_draft

            return open_with_draft(
                path,
                args.draft,
                engine=args.engine,
                device=args.device,
                n_ctx=args.ctx,
                threads=args.threads,
                kv_memory=kv,
                notice=_notice,
                speculate=args.speculate or "auto",
            )
        return open_backend(
            model_path,
            engine=args.engine,
            device=args.device,
            n_ctx=args.ctx,
            threads=args.threads,
            kv_memory=kv,
            notice=_notice,
            speculate="ngram" if lookup else "off",
        )

    name = _served_name(args.model or DEFAULT_MODEL_NAME)
    pool = ModelPool(opener, resolve=_resolver, budget=budget, default_keep_alive=keep_alive)
    pool.load(name, None)  # the model named at start: loaded now, kept until `ripe stop`
    backend = PooledBackend(pool, name)
    try:
        try:
            server = Server(
                backend,
                host=args.host,
                port=args.port,
                api_key=api_key,
                model_name=name,
                embeddings=None if args.no_embeddings else EmbeddingsApi(args.embedder),
                model_path=path,
                pool=pool,
            )
        except OSError as e:
            raise RipelmError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
        if not _is_loopback(args.host) and api_key is None:
            _notice(
                f"warning: listening on {args.host} with no --api-key; anyone who can reach it can use it"
            )
        print(
            f"ripe serve: {server.api.model_name} ({backend.name} on {backend.device}) at "
            f"http://{args.host}:{server.port}/v1 — Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.httpd.server_close()
    finally:
        backend.close()
    return 0
