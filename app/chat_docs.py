"""Document Q&A inside a chat: the attached collection's passages for a question, as numbered sources.

The chat's last user message is answered from the top passages of its collection (hybrid search), with
the prompt and citation rules of `doc_qa` (the same as `ripe ask`); the sources are stored with the
reply so each [n] keeps resolving to a file and lines after a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ripelm.doc_qa import Source, build_messages

SOURCES = 4  # passages retrieved per question
CHUNK_SIZE, CHUNK_OVERLAP = 800, 120  # characters, as `ripe index` defaults


def collection_names() -> list[str]:
    from ripelm.retrieval_cli import store_path
    from ripelm.runtime.retrieval.store import Store

    if not store_path().is_file():
        return []
    with Store(store_path()) as st:
        return [c.name for c in st.collections()]


def index_folder(folder: Path, collection: str, progress: Callable[[Any], None] | None = None) -> Any:
    """Index (or re-index) a folder into a collection with the default embedder, as `ripe index` does;
    `progress(Progress)` is called per file. A collection built with another embedder is refused."""
    from ripelm.retrieval_cli import _open_embedder, store_path
    from ripelm.runtime.retrieval.errors import EmbedderMismatchError, RetrievalError
    from ripelm.runtime.retrieval.indexer import Indexer
    from ripelm.runtime.retrieval.store import Store

    if not folder.is_dir():
        raise RetrievalError(f"{folder} is not a folder")
    emb = _open_embedder(None)
    try:
        with Store(store_path()) as st:
            c = st.find_collection(collection)
            info = emb.info
            if c is None:
                c = st.create_collection(
                    collection,
                    embedder=info.name,
                    embedder_path=str(emb.path),
                    fingerprint=info.fingerprint,
                    dim=info.dim,
                    matryoshka=info.matryoshka,
                    chunk_size=CHUNK_SIZE,
                    chunk_overlap=CHUNK_OVERLAP,
                )
            elif c.fingerprint != info.fingerprint:
                raise EmbedderMismatchError(
                    f"collection '{c.name}' was built with {c.embedder}; "
                    "re-index it with `ripe index --rebuild`"
                )
            return Indexer(st, c, emb, progress=progress).run([folder])
    finally:
        emb.close()


def retrieve(collection: str, question: str, k: int = SOURCES) -> list[Source]:
    """The top passages for `question` in `collection` (opens the collection's embedder for the query)."""
    from ripelm.retrieval_cli import _searcher, store_path
    from ripelm.runtime.retrieval.store import Store

    with Store(store_path()) as st:
        searcher = _searcher(st, collection)
        try:
            hits = searcher.search(question, top_k=k, mode="hybrid")
        finally:
            if searcher.embedder is not None:
                searcher.embedder.close()
    return [
        Source(n, h.where, h.chunk.path, h.chunk.line_start, h.chunk.line_end, h.chunk.page, h.chunk.text)
        for n, h in enumerate(hits, start=1)
    ]


def with_sources(turns: list[dict[str, str]], sources: list[Source]) -> list[dict[str, str]]:
    """The conversation with its last user message asked against the sources (earlier turns kept, the
    chat's own system prompt replaced by the citation rules)."""
    question = turns[-1]["content"]
    earlier = [t for t in turns[:-1] if t["role"] != "system"]
    system, ask = build_messages(question, sources)
    return [system, *earlier, ask]


def fit_sources(
    question: str, sources: list[Source], count_tokens: Callable[[list[dict[str, str]]], int],
    context_length: int, reply_room: int,
) -> list[Source]:  # fmt: skip
    """As many of the passages (best first) as fit the context window with the question and the room kept
    for the reply (as `fit_conversation` keeps it); the least relevant go first. Earlier turns of the
    chat are left out before any passage (`build_prompt`, after this)."""
    limit = context_length - min(max(1, reply_room), context_length // 2)
    kept = list(sources)
    while kept and count_tokens(list(build_messages(question, kept))) > limit:
        kept.pop()
    return kept


def source_records(sources: list[Source]) -> list[dict[str, Any]]:
    return [asdict(s) for s in sources]


def collection_folders(collection: str) -> list[Path]:
    """The folder a collection's documents were indexed from, as far as the store tells: the deepest
    folder holding all of them (the store keeps files, not the paths `ripe index` was given)."""
    import os

    from ripelm.retrieval_cli import store_path
    from ripelm.runtime.retrieval.errors import RetrievalError
    from ripelm.runtime.retrieval.store import Store

    with Store(store_path()) as st:
        paths = list(st.documents(st.get_collection(collection)))
    folders = sorted({os.path.dirname(p) for p in paths})
    if not folders:
        raise RetrievalError(f"collection '{collection}' has no documents: nothing to watch")
    return [Path(os.path.commonpath(folders))]


def watch_collection(
    collection: str, folders: list[Path], stop: Any, on_report: Callable[[Any], None]
) -> None:
    """Re-index ``folders`` into ``collection`` now and after every settled change under them, until
    ``stop.is_set()`` (as `ripe index --watch` does); ``on_report(IndexReport)`` after each run."""
    from ripelm.retrieval_cli import _collection_embedder, store_path
    from ripelm.runtime.retrieval.indexer import Indexer
    from ripelm.runtime.retrieval.store import Store
    from ripelm.runtime.retrieval.watch import FolderWatch

    with Store(store_path()) as st:
        emb = _collection_embedder(st.get_collection(collection))
        try:
            watch = FolderWatch(folders)
            watch.start()

            def reindex() -> None:
                on_report(Indexer(st, st.get_collection(collection), emb).run(folders))

            reindex()  # what changed while nothing watched
            watch.run(reindex, stop)
        finally:
            emb.close()
