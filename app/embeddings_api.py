"""`/v1/embeddings` for `ripe serve`: OpenAI's request and response shapes over our `Embedder`.

The embedding model is opened on the first request (the default one is converted to GGUF on first use,
which takes a while once), then kept. `dimensions` returns the first `dimensions` coordinates of each
vector, re-normalized to unit length: for a Matryoshka-trained model (nomic-embed-text v1.5) that prefix
is itself a good embedding; for others (the default MiniLM) it is what was asked for, at lower quality.
`encoding_format` "base64" (what the official client asks for by default) sends little-endian float32
bytes; "float" sends JSON numbers.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ripelm.errors import EmbeddingsError
from ripelm.models.bundled_embedder import EMBEDDER_NAME

if TYPE_CHECKING:
    from ripelm.runtime.retrieval.embedder import Embedder

MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsApi:
    def __init__(self, spec: str | None = None, *, workers: int | None = None):
        self.spec = spec  # --embedder: a catalog name, a store file or a path; None = the default
        self.workers = workers
        self._embedder: Embedder | None = None
        self._name = ""
        self._lock = threading.Lock()  # one request at a time: the embedder spreads it over its workers

    @property
    def name(self) -> str:
        """The model id clients see (resolving it does not load the model)."""
        if not self._name:
            from ripelm.models.embedder_catalog import resolve_embedder

            self._name = resolve_embedder(self.spec)[1] if self.spec else EMBEDDER_NAME
        return self._name

    def _open(self) -> Embedder:
        if self._embedder is None:
            from ripelm.models.embedder_catalog import resolve_embedder
            from ripelm.runtime.retrieval.embedder import Embedder

            path, name = resolve_embedder(self.spec)
            self._embedder = Embedder(Path(path), name=name, workers=self.workers)
            self._name = name
        return self._embedder

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise EmbeddingsError("'encoding_format' must be 'float' or 'base64'")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise EmbeddingsError("'dimensions' must be a positive integer")
        with self._lock:
            emb = self._open()
            texts = _texts(body.get("input"), emb)
            if dims is not None and dims > emb.dim:
                raise EmbeddingsError(
                    f"'dimensions' is {dims} but {self.name} makes {emb.dim}-dimensional vectors"
                )
            before = emb.tokens_embedded
            vectors = emb.embed(texts)
            used = emb.tokens_embedded - before
        if dims is not None:
            vectors = vectors[:, :dims]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": self.name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None


def _texts(raw: Any, emb: Embedder) -> list[str]:
    """OpenAI's input forms: a string, a list of strings, one token list, or a list of token lists."""
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(_is_id(t) for t in raw):
        items = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise EmbeddingsError("'input' must be a string, a list of strings, or token id lists")
    if not items:
        raise EmbeddingsError("'input' is empty")
    if len(items) > MAX_INPUTS:
        raise EmbeddingsError(f"at most {MAX_INPUTS} inputs per request, got {len(items)}")
    texts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise EmbeddingsError("an input string is empty")
            texts.append(item)
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            try:
                texts.append(emb.detokenize(item))
            except ValueError as e:
                raise EmbeddingsError(str(e)) from e
        else:
            raise EmbeddingsError("every input must be a non-empty string or a non-empty list of token ids")
    return texts


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _encode(v: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in v]
