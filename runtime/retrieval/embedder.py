"""Text -> unit vectors through llama-cpp-python's embedding mode, for any GGUF embedding model.

The model's own pooling (mean, CLS, last token...) is used as the GGUF declares it. Inputs longer than the
model's window are cut to it (keeping the closing separator the tokenizer adds). Flash attention is on:
for a small encoder the plain attention path costs more than the matrix products (measured 2.6x slower
on MiniLM). Work is spread over ``workers`` llama.cpp contexts with one thread each, driven from Python
threads (llama-cpp-python releases the GIL inside llama.cpp): a small model's many short ops make
multi-threaded llama.cpp spin at its barriers, which collapses on a busy 2-core machine, while one
single-threaded context per core keeps both cores busy.

Where the time goes (perf, one core, MiniLM F16, ~176-token chunks): ~70% in llama.cpp's tinyBLAS f16
matmul kernel (FMA-bound), 8% GELU, 3% softmax. Q8_0 or Q4_0 weights measured the same chunks per
CPU-second within noise (10-11.5 on a busy core), and packing several chunks into one 512/1024-token batch
was slower (6.7 at 1024: attention over the packed batch), so the F16 file and one chunk per batch stay.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ripelm.models.errors import ModelFileChangedError, ModelFormatError
from ripelm.models.file_guard import COPY_AT_LOAD_MAX_BYTES, FileState, ModelFileGuard
from ripelm.models.gguf_file import open_gguf
from ripelm.runtime.errors import BackendError

_BATCH_TOKENS = 256  # one llama.cpp batch; a chunk never exceeds the model window


@dataclass(frozen=True)
class EmbedderInfo:
    """What a collection records about the model that made its vectors."""

    name: str
    fingerprint: str  # sha256 of the GGUF's first and last MiB plus its size: a changed file is caught
    dim: int
    matryoshka: bool  # trained so that prefixes of the vector are embeddings themselves
    max_tokens: int
    pooled: bool = True  # the GGUF declares a pooling type (else: mean pooling is asked for)
    query_prefix: str = ""  # task prefixes some models were trained with (nomic-embed: search_query: ...)
    document_prefix: str = ""


def fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def read_info(path: Path, name: str | None = None) -> EmbedderInfo:
    g = open_gguf(path)
    try:
        arch = g.architecture
        dim = int(g.get(f"{arch}.embedding_length", 0) or 0)
        ctx = int(g.get(f"{arch}.context_length", 512) or 512)
        max_tokens = int(g.get("ripelm.embedder.max_tokens", ctx) or ctx)
        matryoshka = g.get("ripelm.embedder.matryoshka")
        pooled = g.get(f"{arch}.pooling_type") is not None
        label = name or str(g.get("general.name") or path.stem)
    finally:
        g.close()
    if dim <= 0:
        raise ModelFormatError(f"{path.name}: no embedding length in the GGUF metadata")
    if matryoshka is None:
        # nomic-embed-text v1.5 is Matryoshka-trained; an unmarked model is assumed not to be
        matryoshka = arch.startswith("nomic-bert") and "v1.5" in label.lower()
    nomic = arch.startswith("nomic-bert")
    return EmbedderInfo(
        label,
        fingerprint(path),
        dim,
        bool(matryoshka),
        min(max_tokens, _BATCH_TOKENS * 2),
        pooled,
        "search_query: " if nomic else "",
        "search_document: " if nomic else "",
    )


def balanced_parts(lengths: list[int], n: int) -> list[list[int]]:
    """Indexes split into ``n`` parts of about equal total length (longest first, each to the lightest
    part): a batch ends when its slowest worker does, so equal counts of unequal texts leave a core idle."""
    parts: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = load.index(min(load))
        parts[k].append(i)
        load[k] += lengths[i] + 16  # a fixed cost per text as well
    return [sorted(p) for p in parts]


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


class Embedder:
    """Embeds texts with a GGUF model; vectors come back L2-normalized, float32, shape (n, dim)."""

    def __init__(self, path: Path, *, name: str | None = None, workers: int | None = None):
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - a hard dependency
            raise BackendError(f"llama-cpp-python is not installed: {e}") from e
        from ripelm.runtime.tokenizer import quiet_llama_logs

        self.path = Path(path)
        loaded = FileState.of(self.path.stat())
        self.info = read_info(self.path, name)
        n = workers or default_workers()
        window = max(self.info.max_tokens, _BATCH_TOKENS)
        quiet_llama_logs()
        self._models = []
        # As the chat engines do (models/file_guard.py): a descriptor on the loaded file, checked before
        # each batch, and the weights copied at load when small, so a file truncated or rewritten on disk
        # ends a request with one error line instead of a SIGBUS in llama.cpp's mapped reads.
        self.file_guard = ModelFileGuard(self.path, loaded)
        try:
            for _ in range(n):
                self._models.append(
                    llama_cpp.Llama(
                        str(self.path),
                        embedding=True,
                        verbose=False,
                        n_ctx=window,
                        n_batch=window,
                        n_ubatch=window,
                        n_threads=1,
                        n_threads_batch=1,
                        flash_attn=True,
                        pooling_type=-1 if self.info.pooled else llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                        use_mmap=loaded.size * n > COPY_AT_LOAD_MAX_BYTES,
                    )
                )
        except Exception as e:
            self.close()
            raise ModelFormatError(
                f"llama.cpp cannot load {self.path.name} as an embedding model: {e}"
            ) from e
        try:
            self.file_guard.check()
        except ModelFileChangedError:
            self.close()
            raise
        if self._models[0].n_embd() != self.info.dim:
            raise ModelFormatError(f"{self.path.name}: metadata and model disagree on the embedding size")
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="embed") if n > 1 else None
        self._local = threading.local()
        self.tokens_embedded = 0

    @property
    def dim(self) -> int:
        return self.info.dim

    def fit(self, text: str, model_index: int = 0) -> str:
        """The text cut to the model's window: what is embedded is exactly what is returned."""
        m = self._models[model_index]
        ids = m.tokenize(text.encode("utf-8", "replace"), add_bos=True, special=False)
        if len(ids) <= self.info.max_tokens:
            return text
        # drop the special tokens at both ends, keep max_tokens - 2 word pieces, render them as text
        body = ids[1 : self.info.max_tokens - 1]
        return m.detokenize(body).decode("utf-8", "ignore")

    def _embed_on(self, index: int, texts: list[str]) -> tuple[np.ndarray, int]:
        m = self._models[index]
        fitted = [self.fit(t, index) or " " for t in texts]
        vecs, count = m.embed(fitted, normalize=False, truncate=True, return_count=True)
        return np.asarray(vecs, dtype=np.float32).reshape(len(texts), self.dim), int(count)

    def embed(self, texts: list[str], *, query: bool = False) -> np.ndarray:
        """Documents (or, with ``query``, search queries) as unit vectors."""
        prefix = self.info.query_prefix if query else self.info.document_prefix
        if prefix:
            texts = [prefix + t for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.file_guard.check()
        n = len(self._models)
        if self._pool is None or len(texts) < 2 * n:
            out, count = self._embed_on(0, texts)
        else:
            parts = balanced_parts([len(t) for t in texts], n)
            futures = [
                self._pool.submit(self._embed_on, i, [texts[j] for j in idx]) for i, idx in enumerate(parts)
            ]
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            count = 0
            for idx, fut in zip(parts, futures, strict=True):
                vecs, c = fut.result()
                out[idx] = vecs
                count += c
        self.tokens_embedded += count
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def detokenize(self, ids: list[int]) -> str:
        """Token ids of this model's vocabulary back to text (ValueError for ids outside it)."""
        m = self._models[0]
        bad = [t for t in ids if not 0 <= t < m.n_vocab()]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {m.n_vocab()}")
        return m.detokenize(ids).decode("utf-8", "replace")

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text], query=True)[0]

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for m in getattr(self, "_models", []):
            m.close()
        self._models = []
        if getattr(self, "file_guard", None) is not None:
            self.file_guard.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
