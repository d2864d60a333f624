"""Retrieval quality on a question set: hit@k and MRR for BM25, dense, Matryoshka + rerank and hybrid.

A question names the file and an exact quote of its supporting passage; a retrieved chunk is relevant
when it comes from that file and its line range overlaps the quote's lines, so the set stays valid
whatever the chunk size. Questions are split in two by id (odd: tuning, even: test) so that fusion
settings chosen on one half are reported on the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ripelm.runtime.retrieval.errors import RetrievalError
from ripelm.runtime.retrieval.search import Hit, Searcher

DEPTH = 10  # MRR is computed over the first DEPTH results


@dataclass
class EvalQuestion:
    id: int
    question: str
    file: str
    quote: str
    style: str  # "keyword" (shares words with the passage) or "paraphrase"
    lines: tuple[int, int] = (0, 0)  # where the quote sits in the file

    @property
    def split(self) -> str:
        return "tune" if self.id % 2 else "test"


def load_questions(path: Path, docs_dir: Path) -> list[EvalQuestion]:
    out: list[EvalQuestion] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = EvalQuestion(**json.loads(line))
        except (ValueError, TypeError) as e:
            raise RetrievalError(f"{path}:{n}: not a question record ({e})") from None
        doc = Path(docs_dir) / q.file
        if not doc.is_file():
            raise RetrievalError(f"{path}:{n}: {q.file} is not in {docs_dir}")
        text = doc.read_text(encoding="utf-8")
        at = text.find(q.quote)
        if at < 0:
            raise RetrievalError(f"{path}:{n}: the quote is not in {q.file}")
        start = text.count("\n", 0, at) + 1
        q.lines = (start, start + q.quote.count("\n"))
        out.append(q)
    return out


def is_relevant(hit: Hit, q: EvalQuestion) -> bool:
    c = hit.chunk
    return Path(c.path).name == q.file and c.line_start <= q.lines[1] and c.line_end >= q.lines[0]


@dataclass
class Scores:
    hits: list[int] = field(default_factory=list)  # rank of the first relevant chunk (1-based), 0 = none
    questions: list[EvalQuestion] = field(default_factory=list)

    def subset(self, keep: Callable[[EvalQuestion], bool]) -> Scores:
        pairs = [(r, q) for r, q in zip(self.hits, self.questions, strict=True) if keep(q)]
        return Scores([r for r, _ in pairs], [q for _, q in pairs])

    def hit_at(self, k: int = 5) -> float:
        return float(np.mean([0 < r <= k for r in self.hits])) if self.hits else 0.0

    def mrr(self) -> float:
        return float(np.mean([1.0 / r if 0 < r <= DEPTH else 0.0 for r in self.hits])) if self.hits else 0.0


def first_relevant(hits: list[Hit], q: EvalQuestion) -> int:
    for rank, h in enumerate(hits, start=1):
        if is_relevant(h, q):
            return rank
    return 0


def run(
    searcher: Searcher, questions: list[EvalQuestion], query_vectors: np.ndarray, **search_kwargs
) -> Scores:
    s = Scores()
    for q, qv in zip(questions, query_vectors, strict=True):
        hits = searcher.search(q.question, top_k=DEPTH, q=qv, **search_kwargs)
        s.hits.append(first_relevant(hits, q))
        s.questions.append(q)
    return s
