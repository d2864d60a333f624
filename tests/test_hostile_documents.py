"""Hostile documents: every bad file is skipped with a reason in bounded time and memory, the rest indexed.

Covers corrupt, encrypted and decompression-bomb PDFs, binary files named .txt, 1 GB files (sparse: no real
gigabyte is written), unreadable permissions, symlink loops, dangling links, a named pipe and a device
posing as text files (the pipe used to block `ripe index` forever). The PDF parser runs in a child process
with address-space and CPU caps (runtime/retrieval/pdf_pages.py).
"""

from __future__ import annotations

import os
import re
import resource
import stat
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pdf_factory import build_pdf
from retrieval_helpers import make_home, ripe

from ripelm.runtime.retrieval.errors import SkipFile
from ripelm.runtime.retrieval.loaders import load

GB = 1 << 30


def bomb_pdf(content_bytes: int, *, text: bool = False) -> bytes:
    """A one-page PDF whose Flate content stream inflates to `content_bytes` of drawing operators; with
    `text`, the page has a font and starts by showing a line of text (pypdf then inflates the stream to
    extract it; a page without fonts it skips)."""
    comp = zlib.compressobj(9)
    chunk = b"0 0 m\n" * (1 << 18)
    head = comp.compress(b"BT /F1 12 Tf 72 720 Td (Hello from the bomb) Tj ET\n") if text else b""
    stream = head + b"".join(comp.compress(chunk) for _ in range(content_bytes // len(chunk))) + comp.flush()
    font = b" /Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R%s >>"
        % (font if text else b""),
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 5\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size 5 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def encrypted_pdf(path: Path) -> None:
    from pypdf import PdfWriter

    plain = path.with_suffix(".plain")
    plain.write_bytes(build_pdf([["secret text"]]))
    w = PdfWriter(clone_from=plain)
    w.encrypt("hunter2")
    w.write(path)
    plain.unlink()


def hostile_folder(root: Path) -> dict[str, str]:
    """Write the hostile files into `root`; returns {name: a word the skip reason must contain}."""
    good = build_pdf([["Paged attention keeps the KV cache in blocks."]])
    expect = {
        "truncated.pdf": "PDF",
        "garbage-xref.pdf": "PDF",
        "encrypted.pdf": "encrypted",
        "bomb.pdf": "decompression bomb",
        "binary.txt": "binary",
        "latin1.md": "UTF-8",
        "huge.txt": "too large",
        "huge.pdf": "too large",
        "loop.txt": "unreadable",
        "dangling.md": "unreadable",
        "pipe.txt": "not a regular file",
        "zero.txt": "not a regular file",
        "empty.txt": "no text",
    }
    (root / "truncated.pdf").write_bytes(good[: len(good) // 2])
    (root / "garbage-xref.pdf").write_bytes(good.replace(b"xref", b"xrxf").replace(b"0 obj", b"0 jbo"))
    encrypted_pdf(root / "encrypted.pdf")
    (root / "bomb.pdf").write_bytes(bomb_pdf(128 << 20))
    (root / "binary.txt").write_bytes(os.urandom(4096) + b"\x00")
    (root / "latin1.md").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    for name, head in (("huge.txt", b"hello\n"), ("huge.pdf", b"%PDF-1.4\n")):
        with open(root / name, "wb") as f:  # a 1 GB file that occupies a few KB: a sparse hole
            f.write(head)
            f.truncate(GB)
    (root / "loop.txt").symlink_to("loop.txt")
    (root / "dangling.md").symlink_to(root / "nowhere.md")
    os.mkfifo(root / "pipe.txt")
    (root / "zero.txt").symlink_to("/dev/zero")
    (root / "empty.txt").write_bytes(b"")
    sub = root / "sub"
    sub.mkdir()
    (sub / "up").symlink_to("..")  # a directory loop: walking must not follow it
    (root / "good.md").write_text("# Notes\n\nThe draft model proposes tokens; the target verifies them.\n")
    (root / "good.pdf").write_bytes(good)
    return expect


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, hostile_folder(root)


@pytest.mark.parametrize(
    "name",
    ["truncated.pdf", "garbage-xref.pdf", "encrypted.pdf", "bomb.pdf", "binary.txt", "latin1.md", "huge.txt",
     "huge.pdf", "loop.txt", "dangling.md", "pipe.txt", "zero.txt"],
)  # fmt: skip
def test_hostile_file_is_skipped_with_a_reason(folder: tuple[Path, dict[str, str]], name: str) -> None:
    root, expect = folder
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(SkipFile, match=expect[name]):
        load(root / name)
    assert time.perf_counter() - start < 30
    # A PDF parser child may use at most its address-space cap (1.5 GB), whatever the file claims.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss <= max(before, 1536 * 1024)


@pytest.mark.parametrize("text", [False, True], ids=["no-fonts", "with-text"])
def test_decompression_bomb_is_named_as_one(tmp_path: Path, text: bool) -> None:
    """Whether pypdf inflates the stream to extract text (and stops at its limit) or skips a page without
    fonts, the reason says the PDF is a decompression bomb, not that it has no text."""
    path = tmp_path / "bomb.pdf"
    path.write_bytes(bomb_pdf(128 << 20, text=text))
    with pytest.raises(SkipFile) as caught:
        load(path)
    assert re.fullmatch(
        r"decompression bomb: a compressed stream in the PDF inflates past the parser's limit of \d+ MB",
        str(caught.value),
    ), caught.value


def test_small_pdf_without_text_still_says_so(tmp_path: Path) -> None:
    path = tmp_path / "drawing.pdf"
    path.write_bytes(bomb_pdf(1 << 20))  # 1 MB of drawing: under the limit, and no text
    with pytest.raises(SkipFile, match=r"^PDF has no extractable text"):
        load(path)


@contextmanager
def as_nobody() -> Iterator[None]:
    """Drop the effective uid to nobody for the block (root reads mode-000 files regardless)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_file_is_skipped_with_permission_denied() -> None:
    # A world-traversable folder outside pytest's private tmp tree, so only the file's own mode decides.
    with tempfile.TemporaryDirectory(prefix="ripelm-perm-") as d:
        os.chmod(d, 0o755)
        locked = Path(d) / "locked.txt"
        locked.write_text("private notes")
        locked.chmod(0)
        readable = Path(d) / "open.txt"
        readable.write_text("public notes")
        readable.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        with as_nobody():
            with pytest.raises(SkipFile, match="permission denied"):
                load(locked)
            assert load(readable).blocks[0].text == "public notes"


def test_index_skips_hostile_files_and_indexes_the_rest(tmp_path: Path) -> None:
    """`ripe index` over a folder of hostile files: exit 0, each one skipped with its reason, good ones in."""
    docs = tmp_path / "docs"
    docs.mkdir()
    expect = hostile_folder(docs)
    home = make_home(tmp_path / "home")
    start = time.perf_counter()
    p = ripe("index", str(docs), "--collection", "hostile", home=home, timeout=300)
    elapsed = time.perf_counter() - start
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    out = p.stdout
    assert ", 2 indexed," in out and f"{len(expect)} skipped" in out, out
    for name, reason in expect.items():
        line = next((ln for ln in out.splitlines() if f"skipped {docs / name}:" in ln), None)
        assert line is not None and reason in line, (name, out)
    assert elapsed < 120, elapsed
    found = ripe("search", "draft model proposes tokens", "--collection", "hostile", home=home)
    assert found.returncode == 0 and "good.md" in found.stdout, found.stdout + found.stderr
