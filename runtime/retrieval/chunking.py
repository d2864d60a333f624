"""Blocks -> chunks of about ``size`` characters that follow headings and paragraphs, with overlap.

Rules: a heading closes the running chunk and opens the next (so a chunk never straddles two sections
and starts with its heading); paragraphs are packed whole while they fit; a paragraph longer than
``size`` is cut at line, then sentence, then word boundaries into pieces of ``size - overlap``.
Overlap: the next chunk of a section starts with the previous chunk's last paragraphs when they fit in
``overlap`` characters, and a piece of a cut paragraph starts with the last ~``overlap`` characters of
the piece before it, so a passage on a boundary is whole in at least one chunk. (Carrying the tail of
an unrelated paragraph instead measurably blurred the next chunk's embedding.) PDF chunks never cross
a page. Each chunk keeps its file's line range (within the page for PDFs) and the section heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ripelm.runtime.retrieval.loaders import Block

DEFAULT_SIZE = 800
DEFAULT_OVERLAP = 120


@dataclass
class Chunk:
    text: str
    line_start: int
    line_end: int
    page: int | None
    heading: str | None


@dataclass
class _Piece:
    text: str
    line_start: int
    line_end: int


def _split_long(b: Block, size: int) -> list[_Piece]:
    """A block longer than ``size`` as pieces of at most ``size`` characters, with their lines."""
    pieces: list[_Piece] = []
    lines = b.text.split("\n")
    cur: list[str] = []
    cur_start = b.line_start
    for offset, line in enumerate(lines):
        ln = b.line_start + offset
        for part in _split_line(line, size):
            if cur and len("\n".join(cur)) + 1 + len(part) > size:
                pieces.append(_Piece("\n".join(cur), cur_start, ln if part is not line else ln - 1))
                cur, cur_start = [], ln
            if not cur:
                cur_start = ln
            cur.append(part)
    if cur:
        pieces.append(_Piece("\n".join(cur), cur_start, b.line_end))
    for p in pieces:
        p.line_end = max(p.line_end, p.line_start)
    return pieces


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def _split_line(line: str, size: int) -> list[str]:
    if len(line) <= size:
        return [line]
    out: list[str] = []
    cur = ""
    for sent in _SENTENCE_END.split(line):
        while len(sent) > size:  # no sentence break: cut at the last space before the limit
            cut = sent.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            if cur:
                out.append(cur)
                cur = ""
            out.append(sent[:cut])
            sent = sent[cut:].lstrip()
        if cur and len(cur) + 1 + len(sent) > size:
            out.append(cur)
            cur = sent
        else:
            cur = f"{cur} {sent}" if cur else sent
    if cur:
        out.append(cur)
    return out


def _tail(p: _Piece, n: int) -> _Piece:
    """The last ~n characters of a piece, starting at a word boundary, with the lines they sit on."""
    cut = len(p.text) - n
    space = p.text.find(" ", cut)
    cut = space + 1 if 0 <= space < len(p.text) - 1 else max(cut, 0)
    first = p.line_start + p.text.count("\n", 0, cut)
    return _Piece(p.text[cut:], min(first, p.line_end), p.line_end)


def chunk_blocks(
    blocks: list[Block], size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP
) -> list[Chunk]:
    if size < 100:
        raise ValueError("chunk size must be at least 100 characters")
    overlap = max(0, min(overlap, size // 2))
    chunks: list[Chunk] = []
    cur: list[_Piece] = []
    fresh = 0  # pieces in cur that no earlier chunk holds (only overlap carried over: nothing to emit)
    section: tuple[int | None, str | None] = (None, None)

    def emit(same_paragraph: bool = False) -> None:
        nonlocal cur, fresh
        if cur and fresh:
            chunks.append(
                Chunk(
                    "\n\n".join(p.text for p in cur),
                    cur[0].line_start,
                    cur[-1].line_end,
                    section[0],
                    section[1],
                )
            )
        # carry the tail pieces that fit in the overlap budget into the next chunk
        carry: list[_Piece] = []
        budget = overlap
        for p in reversed(cur):
            if len(p.text) > budget:
                break
            carry.insert(0, p)
            budget -= len(p.text) + 2
        if not carry and cur and overlap > 0 and same_paragraph:
            # the cut falls inside a long paragraph: its next piece starts with the tail of this one
            # (a tail of an unrelated paragraph would only blur the next chunk's embedding: measured)
            carry = [_tail(cur[-1], overlap)]
        cur, fresh = carry, 0

    for b in blocks:
        key = (b.page, b.heading)
        if b.is_heading or b.page != section[0]:
            emit()
            cur, fresh = [], 0  # no overlap across a heading or a page
            section = key
        elif key != section:
            section = key
        room = size - overlap  # a cut paragraph leaves room for the carried overlap
        pieces = _split_long(b, room) if len(b.text) > size else [_Piece(b.text, b.line_start, b.line_end)]
        for n, p in enumerate(pieces):
            length = sum(len(x.text) + 2 for x in cur)
            if cur and length + len(p.text) > size and fresh:
                emit(same_paragraph=n > 0)
                while cur and sum(len(x.text) + 2 for x in cur) + len(p.text) > size:
                    cur.pop(0)  # the overlap must leave room for the new piece
            cur.append(p)
            fresh += 1
    emit()
    return chunks
