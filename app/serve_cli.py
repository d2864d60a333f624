"""`ripe serve`: flags, model loading and the foreground server loop."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ripelm.models.errors import RipelmError

DEFAULT_MODEL_NAME = "smollm2:135m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model at /v1/chat/completions, /v1/completions and /v1/models (streaming "
        "with server-sent events), and an embedding model at /v1/embeddings (with `dimensions`). "
        "Concurrent requests are batched by the native engine. Listens on "
        "127.0.0.1 unless --host says otherwise.",
        epilog="Example:\n  ripe serve --port 8080\n  curl http://127.0.0.1:8080/v1/models",
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
        "--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks a free one)"
    )
    p.add_argument(
        "--embedder",
        default=None,
        metavar="NAME",
        help="embedding model for /v1/embeddings: a name (`ripe collections embedders` lists them), a file "
        "in the store or a .gguf path (default: the bundled all-minilm:l6-v2, loaded on first use)",
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


def cmd_serve(args: argparse.Namespace) -> int:
    from ripelm.commands import _notice
    from ripelm.embeddings_api import EmbeddingsApi
    from ripelm.models.store import resolve_model
    from ripelm.runtime.engines import open_backend
    from ripelm.runtime.kv_cache import parse_memory
    from ripelm.server import Server

    if not 0 <= args.port <= 65535:
        raise RipelmError(f"--port must be between 0 and 65535, not {args.port}")
    api_key = args.api_key or os.environ.get("RIPELM_API_KEY") or None
    path = resolve_model(args.model)
    kv = parse_memory(args.kv_memory) if args.kv_memory else None
    if args.draft:
        if args.speculate in ("ngram", "off"):
            raise RipelmError(f"--speculate {args.speculate} and --draft contradict each other")
        from ripelm.runtime.draft_pairing import open_with_draft

        backend = open_with_draft(
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
    else:
        if args.speculate == "draft":
            raise RipelmError("--speculate draft needs --draft MODEL (or --draft auto)")
        # auto: prompt lookup where the native engine runs (llama.cpp, asked for by name, cannot speculate)
        lookup = args.speculate == "ngram" or (args.speculate == "auto" and args.engine != "llama.cpp")
        backend = open_backend(
            path,
            engine=args.engine,
            device=args.device,
            n_ctx=args.ctx,
            threads=args.threads,
            kv_memory=kv,
            notice=_notice,
            speculate="ngram" if lookup else "off",
        )
    try:
        try:
            server = Server(
                backend,
                host=args.host,
                port=args.port,
                api_key=api_key,
                model_name=args.model or DEFAULT_MODEL_NAME,
                embeddings=None if args.no_embeddings else EmbeddingsApi(args.embedder),
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
