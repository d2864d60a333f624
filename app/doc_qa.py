"""Prompt assembly for document Q&A: numbered sources, the question, and citations that must resolve.

The retrieved chunks become sources [1]..[n], each headed by where it comes from; the model is asked to
answer only from them and to cite them as [n]. While the answer streams, :class:`CitationFilter` drops
any [n] that names no source (a small model invents numbers), so every citation the user sees resolves
to a file and a line or page range, which are listed after the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM = (
    "You answer questions using only the numbered sources the user gives you. After each statement, cite "
    "the source it comes from as [1], [2] and so on. If the sources do not contain the answer, say so."
)


@dataclass
class Source:
    number: int
    where: str  # "path:12-30" or "path (p. 4, lines 3-9)"
    path: str
    line_start: int
    line_end: int
    page: int | None
    text: str


def build_messages(question: str, sources: list[Source]) -> list[dict[str, str]]:
    """System rules, then the sources as numbered excerpts and the question. Locations stay out of the
    prompt (a small model copies paths instead of answering); they are listed under the answer."""
    parts = [f"[{s.number}] {' '.join(s.text.split())}" for s in sources]
    user = (
        f"Question: {question.strip()}\n\nSources:\n"
        + "\n\n".join(parts)
        + f"\n\nUsing the sources, answer the question: {question.strip()} Cite sources like [1]."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_CITE = re.compile(r"\[(\d{1,3})\]")


def cited_numbers(text: str) -> list[int]:
    out: list[int] = []
    for m in _CITE.finditer(text):
        n = int(m.group(1))
        if n not in out:
            out.append(n)
    return out


class CitationFilter:
    """Streams text through, holding back a possible ``[digits`` until it is known to be a citation, and
    dropping citations of numbers outside ``valid``."""

    def __init__(self, valid: set[int]):
        self.valid = valid
        self._held = ""
        self.dropped: list[str] = []

    def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            if self._held:
                self._held += ch
                if ch == "]":
                    m = _CITE.fullmatch(self._held)
                    if m and int(m.group(1)) not in self.valid:
                        self.dropped.append(self._held)
                    else:
                        out.append(self._held)
                    self._held = ""
                elif not ch.isdigit() or len(self._held) > 5:
                    out.append(self._held)
                    self._held = ""
            elif ch == "[":
                self._held = ch
            else:
                out.append(ch)
        return "".join(out)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def sources_footer(sources: list[Source], cited: list[int]) -> str:
    """The source list printed under the answer: the cited ones, or all of them if none was cited."""
    by_number = {s.number: s for s in sources}
    chosen = [by_number[n] for n in cited if n in by_number] or sources
    title = "Sources:" if cited and any(n in by_number for n in cited) else "Sources (retrieved):"
    return "\n".join([title] + [f"  [{s.number}] {s.where}" for s in chosen])
