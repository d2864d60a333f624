"""PDF text, page by page, parsed in a child process that a hostile file cannot hang or blow up.

pypdf (pure Python) does the parsing, in ``python -m ripelm.runtime.retrieval.pdf_pages FILE``, with an
address-space cap, a CPU-time cap and a wall-clock timeout; the parent reads JSON from its stdout. A
crafted PDF (a decompression bomb, a cyclic object graph, a huge content stream) then costs at most those
limits, and the indexer skips it with the reason. Encrypted PDFs open only if the empty password works.

A decompression bomb is named as one: pypdf stops inflating a stream at its own output limit
(`LimitReachedError`), and a page that gave no text has its content streams inflated too (pypdf skips the
content of a page without fonts, which would hide a bomb behind "no extractable text").
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from ripelm.runtime.retrieval.errors import SkipFile
from ripelm.runtime.retrieval.loaders import Block, text_blocks

MEMORY_LIMIT = 1536 * 1024 * 1024  # bytes of address space for the parser process
CPU_SECONDS = 120
WALL_SECONDS = 180
MAX_CHARS = 20_000_000  # text the parser may hand back, all pages together

_EXIT_ENCRYPTED = 3
_EXIT_BROKEN = 4
_EXIT_MEMORY = 5
_EXIT_NO_PYPDF = 6
_EXIT_BOMB = 7


def _limit_self() -> None:
    """Caps for the parser process, set by the child itself before it imports pypdf (a preexec_fn would
    run between fork and exec, which is unsafe in a parent that has threads, as the indexer does)."""
    memory = int(os.environ.get("RIPELM_PDF_MEMORY_MB", MEMORY_LIMIT >> 20)) << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def pdf_page_texts(path: Path, *, wall_seconds: float = WALL_SECONDS) -> list[str]:
    cmd = [sys.executable, "-m", "ripelm.runtime.retrieval.pdf_pages", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=wall_seconds, env=_child_env(), check=False)
    except subprocess.TimeoutExpired:
        raise SkipFile(f"PDF parser timed out after {wall_seconds:.0f} s") from None
    if proc.returncode == _EXIT_ENCRYPTED:
        raise SkipFile("encrypted PDF")
    if proc.returncode == _EXIT_BROKEN:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SkipFile(f"broken PDF ({msg[-1] if msg else 'unreadable'})")
    if proc.returncode == _EXIT_BOMB:
        limit = proc.stderr.decode("utf-8", "replace").strip()
        raise SkipFile(
            "decompression bomb: a compressed stream in the PDF inflates past the parser's limit"
            + (f" of {limit}" if limit else "")
        )
    if proc.returncode == _EXIT_NO_PYPDF:
        raise SkipFile("PDF support is unavailable (pypdf cannot be imported)")
    if proc.returncode != 0:
        if proc.returncode < 0 or proc.returncode == _EXIT_MEMORY or b"MemoryError" in proc.stderr:
            raise SkipFile("PDF parser hit its memory or CPU limit")
        raise SkipFile(f"PDF parser failed (exit {proc.returncode})")
    try:
        pages = json.loads(proc.stdout)
    except ValueError:
        raise SkipFile("PDF parser returned garbage") from None
    if not isinstance(pages, list) or not all(isinstance(p, str) for p in pages):
        raise SkipFile("PDF parser returned garbage")
    return pages


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def pdf_blocks(path: Path, data: bytes | None = None) -> list[Block]:
    if data is not None and not data.startswith(b"%PDF-") and b"%PDF-" not in data[:1024]:
        raise SkipFile("not a PDF (no %PDF header)")
    blocks: list[Block] = []
    for number, text in enumerate(pdf_page_texts(path), start=1):
        for b in text_blocks(text.replace("\r\n", "\n"), "text"):
            b.page = number
            blocks.append(b)
    if not blocks:
        raise SkipFile("PDF has no extractable text (scanned images?)")
    return blocks


def _main(argv: list[str]) -> int:  # the child process
    import logging

    _limit_self()
    logging.disable(logging.CRITICAL)  # pypdf logs warnings about sloppy files to stderr
    try:
        from pypdf import PdfReader
        from pypdf.errors import FileNotDecryptedError, LimitReachedError, PdfReadError
    except MemoryError:
        return _EXIT_MEMORY
    except ImportError as e:
        print(f"pypdf cannot be imported: {e}", file=sys.stderr)
        return _EXIT_MEMORY if "failed to map" in str(e) else _EXIT_NO_PYPDF
    try:
        reader = PdfReader(argv[0], strict=False)
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    return _EXIT_ENCRYPTED
            except (FileNotDecryptedError, NotImplementedError):
                return _EXIT_ENCRYPTED
        pages: list[str] = []
        total = 0
        for page in reader.pages:
            text = page.extract_text() or ""
            if not text.strip():
                page.get_contents()  # inflated within pypdf's limit: a bomb raises LimitReachedError
            total += len(text)
            if total > MAX_CHARS:
                print("more text than the limit", file=sys.stderr)
                return _EXIT_BROKEN
            pages.append(text)
    except FileNotDecryptedError:
        return _EXIT_ENCRYPTED
    except LimitReachedError:
        print(_inflate_limit(), file=sys.stderr)
        return _EXIT_BOMB
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return _EXIT_BROKEN
    sys.stdout.write(json.dumps(pages))
    return 0


def _inflate_limit() -> str:
    """pypdf's cap on one stream's inflated size, in words ("" where this pypdf does not say)."""
    try:
        from pypdf import get_configuration

        limit = get_configuration().zlib_maximum_output_length
    except (ImportError, AttributeError):
        from pypdf import filters

        limit = getattr(filters, "ZLIB_MAX_OUTPUT_LENGTH", None)
    return f"{limit / 1e6:.0f} MB" if isinstance(limit, int) else ""


if __name__ == "__main__":
    try:
        code = _main(sys.argv[1:])
    except MemoryError:
        code = _EXIT_MEMORY
    raise SystemExit(code)
