"""`ripe index`, `ripe search`, `ripe ask` and `ripe collections`: document Q&A from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ripelm.models.store import data_dir

DEFAULT_COLLECTION = "default"
ArgAdder = Callable[[argparse.ArgumentParser], None]


def store_path() -> Path:
    return data_dir() / "retrieval.db"


def add_parsers(sub: argparse._SubParsersAction, *, model_args: ArgAdder, sampling_args: ArgAdder) -> None:
    from ripelm.draft_cli import add_draft_args

    idx = sub.add_parser(
        "index",
        help="add files and folders to a document collection",
        description="Index .txt .md .rst .html .pdf .docx .epub and source files into a collection. "
        "Re-running only re-embeds files whose content changed and drops files that were deleted.",
    )
    idx.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    idx.add_argument(
        "--collection", "-c", default=DEFAULT_COLLECTION, help="collection name (default: default)"
    )
    idx.add_argument(
        "--embedder", default=None, help="embedding model: catalog name or .gguf path (default: all-minilm)"
    )
    idx.add_argument("--chunk-size", type=int, default=800, help="characters per chunk (default 800)")
    idx.add_argument("--overlap", type=int, default=120, help="characters shared by neighbours (default 120)")
    idx.add_argument("--rebuild", action="store_true", help="drop the collection's vectors and re-embed all")
    idx.add_argument("--workers", type=int, default=None, help="embedding workers (default: one per core)")
    idx.add_argument(
        "--watch",
        action="store_true",
        help="after indexing, keep watching the paths and re-index files as they are added, changed or "
        "deleted (Ctrl-C stops)",
    )

    se = sub.add_parser("search", help="find the chunks that best match a query")
    se.add_argument("query")
    se.add_argument("--collection", "-c", default=DEFAULT_COLLECTION)
    se.add_argument("--top-k", "-k", type=int, default=5, help="results to show (default 5)")
    se.add_argument(
        "--mode",
        default="hybrid",
        choices=["hybrid", "matryoshka", "dense", "bm25"],
        help="hybrid = Matryoshka shortlist + BM25 fused, reranked at full dimension (default)",
    )
    se.add_argument("--no-hybrid", action="store_true", help="dense only (same as --mode matryoshka)")
    se.add_argument("--dim", type=int, default=None, help="shortlist prefix length (default: by size)")
    se.add_argument("--full", action="store_true", help="print whole chunks, not a preview")

    ask = sub.add_parser(
        "ask",
        help="answer a question from a collection, with citations",
        description="Retrieve the best chunks of a collection and stream an answer grounded in them; "
        "citations [n] resolve to file and lines (or page).",
    )
    ask.add_argument("question", help="the question; '-' reads it from standard input")
    ask.add_argument("--collection", "-c", default=DEFAULT_COLLECTION)
    ask.add_argument("--sources", type=int, default=4, help="chunks given to the model (default 4)")
    ask.add_argument("--stats", action="store_true", help="print speed and token counts to stderr afterwards")
    model_args(ask)
    add_draft_args(ask)
    sampling_args(ask)

    co = sub.add_parser(
        "collections",
        help="list document collections, remove one, or list the embedding models",
        description="ripe collections [list] | ripe collections rm NAME | ripe collections embedders",
    )
    co.add_argument("action", nargs="?", choices=["list", "rm", "embedders"], default="list")
    co.add_argument("name", nargs="?", help="collection to remove (with rm)")

    from ripelm.bench import retrieval as retrieval_bench

    retrieval_bench.add_parsers(sub)


def _open_embedder(spec: str | None, workers: int | None = None):
    from ripelm.models.embedder_catalog import resolve_embedder
    from ripelm.runtime.retrieval.embedder import Embedder

    path, name = resolve_embedder(spec)
    return Embedder(path, name=name, workers=workers)


def _collection_embedder(collection):
    """The embedder a collection was built with (the bundled one is re-created if its cache is gone)."""
    from ripelm.models.bundled_embedder import EMBEDDER_NAME

    spec = None if collection.embedder == EMBEDDER_NAME else collection.embedder_path
    return _open_embedder(spec, workers=1)  # one query: one llama.cpp context is enough


class _Bar:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, p) -> None:
        if not self.tty:
            return
        width = 30
        filled = int(width * p.done / max(1, p.total))
        rate = p.chunks / max(1e-9, time.perf_counter() - self.t0)
        name = Path(p.path).name[:30]
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {p.done}/{p.total} files, {p.chunks} chunks "
            f"({rate:.1f}/s) {name:<30}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def cmd_index(args: argparse.Namespace) -> int:
    from ripelm.runtime.retrieval.errors import EmbedderMismatchError, RetrievalError
    from ripelm.runtime.retrieval.indexer import Indexer
    from ripelm.runtime.retrieval.search import prepare_vectors
    from ripelm.runtime.retrieval.store import Store

    if args.chunk_size < 100 or not 0 <= args.overlap <= args.chunk_size // 2:
        raise RetrievalError("--chunk-size must be >= 100 and --overlap between 0 and half the chunk size")
    emb = _open_embedder(args.embedder, args.workers)
    try:
        with Store(store_path()) as st:
            c = st.find_collection(args.collection)
            info = emb.info
            if c is None:
                c = st.create_collection(
                    args.collection,
                    embedder=info.name,
                    embedder_path=str(emb.path),
                    fingerprint=info.fingerprint,
                    dim=info.dim,
                    matryoshka=info.matryoshka,
                    chunk_size=args.chunk_size,
                    chunk_overlap=args.overlap,
                )
            elif c.fingerprint != info.fingerprint and not args.rebuild:
                raise EmbedderMismatchError(
                    f"collection '{c.name}' was built with {c.embedder}; indexing with {info.name} would "
                    "mix vectors from two models. Re-run with --rebuild to re-embed everything."
                )
            elif args.rebuild:
                c = st.clear(
                    c,
                    embedder=info.name,
                    embedder_path=str(emb.path),
                    fingerprint=info.fingerprint,
                    dim=info.dim,
                    matryoshka=info.matryoshka,
                )
            bar = _Bar()
            try:
                report = Indexer(st, c, emb, progress=bar).run(args.paths)
            finally:
                bar.close()
            _print_report(args.collection, report)
            prepare_vectors(st, st.get_collection(c.name))
            if args.watch:
                _watch(st, c, emb, args.paths)
    finally:
        emb.close()
    return 0


def _print_report(name: str, report) -> None:
    rate = report.chunks_added / report.embed_seconds if report.embed_seconds > 0 else 0.0
    print(
        f"collection '{name}': {report.files} files, {report.indexed} indexed, "
        f"{report.unchanged} unchanged, {report.removed} removed, {len(report.skipped)} skipped; "
        f"{report.chunks_added} chunks embedded ({rate:.1f} chunks/s), {report.chunks_total} in total; "
        f"{report.seconds:.1f} s",
        flush=True,
    )
    for path, reason in report.skipped[:20]:
        print(f"  skipped {path}: {reason}")
    if len(report.skipped) > 20:
        counts = Counter(r for _, r in report.skipped[20:])
        print("  ... and " + ", ".join(f"{n} more ({r})" for r, n in counts.most_common()))
    sys.stdout.flush()


def _watch(st, c, emb, paths: list[Path]) -> None:
    """Re-index ``paths`` whenever files under them change, until Ctrl-C."""
    import threading

    from ripelm.runtime.retrieval.indexer import Indexer
    from ripelm.runtime.retrieval.watch import FolderWatch

    watch = FolderWatch(paths)
    stop = threading.Event()
    seen_skips: set[tuple[str, str]] = set()

    def reindex() -> None:
        report = Indexer(st, st.get_collection(c.name), emb).run(paths)
        fresh = [s for s in report.skipped if s not in seen_skips]
        seen_skips.update(report.skipped)
        if report.indexed or report.removed or fresh:
            when = time.strftime("%H:%M:%S")
            print(
                f"{when} {report.indexed} indexed, {report.removed} removed, {len(fresh)} skipped; "
                f"{report.chunks_total} chunks in total",
                flush=True,
            )
            for path, reason in fresh[:20]:
                print(f"  skipped {path}: {reason}", flush=True)

    watch.start()
    how = "polling: the OS refused more file watches" if watch.polling else "Ctrl-C stops"
    print(f"watching {len(paths)} path(s) for changes ({how})", flush=True)
    try:
        reindex()  # what changed while the first pass ran
        watch.run(reindex, stop)
    except KeyboardInterrupt:
        stop.set()
        watch.stop()
        print("stopped watching", flush=True)


def _searcher(st, name: str):
    from ripelm.runtime.retrieval.search import Searcher

    c = st.get_collection(name)
    return Searcher(st, c, _collection_embedder(c))


def cmd_search(args: argparse.Namespace) -> int:
    from ripelm.runtime.retrieval.store import Store

    mode = "matryoshka" if args.no_hybrid and args.mode == "hybrid" else args.mode
    with Store(store_path()) as st:
        s = _searcher(st, args.collection)
        try:
            hits = s.search(args.query, top_k=args.top_k, mode=mode, dim=args.dim)
        finally:
            if s.embedder is not None:
                s.embedder.close()
    if not hits:
        print("no matches")
        return 0
    for rank, h in enumerate(hits, start=1):
        print(f"{rank}. {h.where}  score {h.score:.3f}")
        text = h.chunk.text.strip()
        if not args.full:
            text = " ".join(text.split())
            text = text[:240] + ("..." if len(text) > 240 else "")
        print("   " + text.replace("\n", "\n   "))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from ripelm.commands import format_stats, open_from_args, sampling_from_args
    from ripelm.doc_qa import CitationFilter, Source, build_messages, cited_numbers, sources_footer
    from ripelm.remote_fit import remote_reply
    from ripelm.runtime.backend import prompt_ids, stream
    from ripelm.runtime.errors import ContextOverflowError, EmptyPromptError
    from ripelm.runtime.retrieval.store import Store

    question = sys.stdin.read() if args.question == "-" else args.question
    if not question.strip():
        raise EmptyPromptError("the question is empty")
    params = sampling_from_args(args)
    with Store(store_path()) as st:
        s = _searcher(st, args.collection)
        try:
            hits = s.search(question, top_k=max(1, args.sources), mode="hybrid")
        finally:
            if s.embedder is not None:
                s.embedder.close()
    if not hits:
        print(f"collection '{args.collection}' has nothing that matches; index some files first")
        return 0
    sources = [
        Source(n, h.where, h.chunk.path, h.chunk.line_start, h.chunk.line_end, h.chunk.page, h.chunk.text)
        for n, h in enumerate(hits, start=1)
    ]
    backend = open_from_args(args)
    try:
        if backend.caps.takes_messages:  # a server engine: it owns template and tokenizer
            events = remote_reply(backend, build_messages(question, sources), params)
        else:
            while True:  # drop the weakest sources until the prompt leaves room for the answer
                text = backend.template.render(build_messages(question, sources), add_generation_prompt=True)
                try:
                    ids = prompt_ids(backend, text, add_bos=False)
                    if len(ids) + min(params.max_tokens, 256) <= backend.context_length or len(sources) == 1:
                        break
                except ContextOverflowError:
                    if len(sources) == 1:
                        raise
                sources = sources[:-1]
            events = stream(backend, ids, params)
        filt = CitationFilter({src.number for src in sources})
        answer: list[str] = []
        stats = None
        for ev in events:
            out = filt.feed(ev.text) if ev.text else ""
            if ev.done:
                out += filt.flush()
                stats = ev.stats
            if out:
                sys.stdout.write(out)
                sys.stdout.flush()
                answer.append(out)
    finally:
        backend.close()
    sys.stdout.write("\n\n" + sources_footer(sources, cited_numbers("".join(answer))) + "\n")
    if args.stats and stats is not None:
        print(format_stats(stats), file=sys.stderr)
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    from ripelm.runtime.retrieval.errors import RetrievalError
    from ripelm.runtime.retrieval.store import Store

    if args.action == "embedders":
        from ripelm.models.embedder_catalog import CATALOG, embedders_dir

        for e in CATALOG:
            here = (embedders_dir() / e.file).is_file() or e.source.startswith("bundled")
            have = "installed" if here else ""
            mrl = "Matryoshka" if e.matryoshka else "PCA prefixes"
            print(f"{e.name:<24} {e.dim:>4}-d  {mrl:<12}  {have:<9}  {e.note} [{e.source}]")
        return 0
    with Store(store_path()) as st:
        if args.action == "rm":
            if not args.name:
                raise RetrievalError("say which collection to remove: ripe collections rm NAME")
            st.remove_collection(args.name)
            print(f"removed collection '{args.name}'")
            return 0
        cols = st.collections()
        if not cols:
            print("no collections yet; create one with `ripe index PATH --collection NAME`")
            return 0
        print(f"{'NAME':<20} {'DOCS':>6} {'CHUNKS':>7}  {'EMBEDDER':<20} {'DIM':>4}  UPDATED")
        for c in cols:
            docs = len(st.documents(c))
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
            kind = "" if c.matryoshka else " (PCA)"
            print(
                f"{c.name:<20} {docs:>6} {st.chunk_count(c):>7}  {c.embedder + kind:<20} {c.dim:>4}  {when}"
            )
    return 0


def _bench(name: str):
    def run(args: argparse.Namespace) -> int:
        from ripelm.bench import retrieval as retrieval_bench

        return retrieval_bench.HANDLERS[name](args)

    return run


HANDLERS = {
    "index": cmd_index,
    "search": cmd_search,
    "ask": cmd_ask,
    "collections": cmd_collections,
    "retrieval-eval": _bench("retrieval-eval"),
    "retrieval-bench": _bench("retrieval-bench"),
}
