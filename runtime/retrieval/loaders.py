"""Files -> text blocks with their place in the file (page, line range, heading), or a reason to skip.

A block is a paragraph (text between blank lines), a heading, or an HTML block element. Plain text,
Markdown, reStructuredText and source code keep their own line numbers; HTML blocks carry the source
lines they came from; PDF blocks carry their page (parsed in a sandboxed subprocess, see pdf_pages);
Word and EPUB files are read by book_loaders.
Anything we cannot or should not read raises :class:`SkipFile` with a short reason, and indexing goes on.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ripelm.runtime.retrieval.errors import SkipFile

MAX_TEXT_BYTES = 20 * 1024 * 1024
MAX_PDF_BYTES = 200 * 1024 * 1024

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
CODE_SUFFIXES = {
    ".py",
    ".pyi",
    ".js",
    ".mjs",
    ".ts",
    ".tsx",
    ".jsx",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".cxx",
    ".cu",
    ".go",
    ".rs",
    ".java",
    ".kt",
    ".scala",
    ".swift",
    ".rb",
    ".php",
    ".cs",
    ".m",
    ".lua",
    ".pl",
    ".r",
    ".sh",
    ".bash",
    ".zsh",
    ".sql",
    ".toml",
    ".yaml",
    ".yml",
    ".ini",
    ".cfg",
    ".css",
    ".scss",
    ".vue",
    ".jl",
    ".hs",
    ".ml",
    ".ex",
    ".exs",
    ".erl",
    ".clj",
    ".dart",
    ".zig",
    ".nim",
    ".tex",
}
BOOK_SUFFIXES = {".docx": "docx", ".epub": "epub"}  # zip containers, see book_loaders
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | CODE_SUFFIXES | {".pdf"} | set(BOOK_SUFFIXES)


@dataclass
class Block:
    text: str
    line_start: int  # 1-based, inclusive; within the page for PDFs
    line_end: int
    page: int | None = None  # 1-based PDF page
    heading: str | None = None  # the nearest heading above this block
    is_heading: bool = False


@dataclass
class LoadedFile:
    path: Path
    kind: str  # text, markdown, rst, html, pdf, code, docx, epub
    blocks: list[Block]


def kind_of(path: Path) -> str | None:
    s = path.suffix.lower()
    if s in (".md", ".markdown"):
        return "markdown"
    if s == ".rst":
        return "rst"
    if s in TEXT_SUFFIXES:
        return "text"
    if s in HTML_SUFFIXES:
        return "html"
    if s == ".pdf":
        return "pdf"
    if s in BOOK_SUFFIXES:
        return BOOK_SUFFIXES[s]
    if s in CODE_SUFFIXES:
        return "code"
    return None


def decode_text(data: bytes) -> str:
    """UTF-8 (a BOM allowed) text, or SkipFile: NUL bytes or invalid UTF-8 mean binary."""
    if b"\x00" in data[:65536]:
        raise SkipFile("binary file (NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipFile(f"not UTF-8 text (bad byte at offset {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load(path: Path, data: bytes | None = None) -> LoadedFile:
    """Read and split one file; ``data`` is its content when the caller already read it (for hashing)."""
    kind = kind_of(path)
    if kind is None:
        raise SkipFile(f"unsupported file type '{path.suffix or path.name}'")
    if data is None:
        data = read_bytes(path, kind)
    if kind == "pdf":
        from ripelm.runtime.retrieval.pdf_pages import pdf_blocks

        return LoadedFile(path, kind, pdf_blocks(path, data))
    if kind in ("docx", "epub"):
        from ripelm.runtime.retrieval.book_loaders import docx_blocks, epub_blocks

        return LoadedFile(path, kind, (docx_blocks if kind == "docx" else epub_blocks)(data))
    text = decode_text(data)
    if kind == "html":
        blocks = html_blocks(text)
    else:
        blocks = text_blocks(text, kind)
    return LoadedFile(path, kind, blocks)


def read_bytes(path: Path, kind: str | None = None) -> bytes:
    """The file's bytes, or SkipFile for anything that is not a readable regular file within the limit.

    The file is opened non-blocking and checked with fstat on that descriptor: a FIFO named notes.txt
    would otherwise block the open (or read) forever, and a device (a symlink to /dev/zero) never ends.
    """
    limit = MAX_PDF_BYTES if (kind or kind_of(path)) in ("pdf", "docx", "epub") else MAX_TEXT_BYTES
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SkipFile(f"not a regular file ({_file_kind(st.st_mode)})")
            if st.st_size > limit:
                raise SkipFile(f"too large ({st.st_size / 1e6:.0f} MB > {limit / 1e6:.0f} MB)")
            data = f.read(limit + 1)
            if len(data) > limit:  # it grew after the check
                raise SkipFile(f"too large (over {limit / 1e6:.0f} MB)")
            return data
    except PermissionError:
        raise SkipFile("permission denied") from None
    except OSError as e:
        raise SkipFile(f"unreadable ({e.strerror or e})") from None


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "special"


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:_.])\1{2,}\s*$")
_CODE_DEF = re.compile(r"^(?:async\s+def|def|class|func|fn|function|impl|struct|interface|type)\s+(\w+)")


def _heading_of(lines: list[str], i: int, kind: str) -> tuple[str | None, int]:
    """(heading text, lines it spans) if a heading starts at line i, else (None, 0)."""
    line = lines[i]
    if kind == "markdown":
        m = _MD_HEADING.match(line)
        if m:
            return m.group(2), 1
        if i + 1 < len(lines) and line.strip() and re.match(r"^(=+|-+)\s*$", lines[i + 1]):
            return line.strip(), 2
    if kind == "rst" and line.strip() and i + 1 < len(lines):
        under = lines[i + 1]
        if _RST_UNDERLINE.match(under) and len(under.rstrip()) >= len(line.rstrip()):
            return line.strip(), 2
    if kind == "code":
        m = _CODE_DEF.match(line)
        if m:
            return line.strip().rstrip(":{").strip(), 0
    return None, 0


def text_blocks(text: str, kind: str) -> list[Block]:
    """Paragraphs and headings with 1-based line ranges. Code: blank-line separated blocks, top-level
    definitions start a new one and name it."""
    lines = text.split("\n")
    blocks: list[Block] = []
    heading: str | None = None
    start: int | None = None
    buf: list[str] = []
    fence = False

    def flush(end: int) -> None:  # ``end``: index of the first line after the block
        nonlocal start, buf
        while buf and not buf[-1].strip():
            buf.pop()
        if start is not None and buf:
            blocks.append(Block("\n".join(buf), start + 1, start + len(buf), heading=heading))
        start, buf = None, []

    i = 0
    while i < len(lines):
        line = lines[i]
        if kind == "markdown" and line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        if not fence:
            h, span = _heading_of(lines, i, kind)
            if h is not None and span > 0:
                flush(i)
                heading = h
                blocks.append(Block(h, i + 1, i + span, heading=h, is_heading=True))
                i += span
                continue
            if h is not None:  # a code definition: starts a block, names it, stays in the text
                flush(i)
                heading = h
        if not line.strip() and not fence and kind != "code":
            flush(i)
        elif not line.strip() and kind == "code" and buf and not lines[i - 1].strip():
            flush(i)  # two blank lines end a code block; one does not
        else:
            if start is None:
                start = i
            buf.append(line)
        i += 1
    flush(len(lines))
    return blocks


class _HTMLText(HTMLParser):
    BLOCK = {
        "p",
        "div",
        "li",
        "ul",
        "ol",
        "tr",
        "table",
        "section",
        "article",
        "header",
        "footer",
        "blockquote",
        "pre",
        "dd",
        "dt",
        "br",
        "hr",
        "main",
        "nav",
        "aside",
        "figure",
        "td",
        "th",
    }
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6", "title"}
    SKIP = {"script", "style", "noscript", "template", "svg", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.parts: list[str] = []
        self.start_line: int | None = None
        self.skip_depth = 0
        self.in_heading = False
        self.in_title = False
        self.heading: str | None = None

    def _flush(self) -> None:
        text = re.sub(r"[ \t\f\v]+", " ", "".join(self.parts))
        text = "\n".join(s.strip() for s in text.split("\n") if s.strip())
        if text and self.start_line is not None:
            end = self.getpos()[0]
            if self.in_heading:
                self.heading = text.replace("\n", " ")
            self.blocks.append(
                Block(
                    text,
                    self.start_line,
                    max(end, self.start_line),
                    heading=self.heading,
                    is_heading=self.in_heading,
                )
            )
        self.parts, self.start_line = [], None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP and tag != "head":
            self.skip_depth += 1
        elif tag == "title":
            self._flush()
            self.in_heading = True
        elif tag in self.HEADINGS or tag in self.BLOCK:
            self._flush()
            self.in_heading = tag in self.HEADINGS

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and tag != "head":
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.HEADINGS or tag in self.BLOCK:
            self._flush()
            self.in_heading = False

    def handle_data(self, data: str) -> None:
        if self.skip_depth or not data.strip() and not self.parts:
            return
        if self.start_line is None:
            lead = data[: len(data) - len(data.lstrip())]
            self.start_line = self.getpos()[0] + lead.count("\n")
        self.parts.append(data)


def html_blocks(text: str) -> list[Block]:
    p = _HTMLText()
    try:
        p.feed(text)
        p.close()
    except Exception as e:  # html.parser is lenient; anything it still rejects is a broken file
        raise SkipFile(f"unparsable HTML ({e})") from None
    p._flush()
    return p.blocks
