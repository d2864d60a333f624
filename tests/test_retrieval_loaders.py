"""Loaders and chunking: every format to blocks with true line ranges, bad files skipped with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from pdf_factory import build_pdf

from ripelm.runtime.retrieval import loaders, pdf_pages
from ripelm.runtime.retrieval.chunking import chunk_blocks
from ripelm.runtime.retrieval.errors import SkipFile
from ripelm.runtime.retrieval.loaders import load

MARKDOWN = """# Paged attention

The KV cache is split into fixed-size blocks.
A block table maps logical to physical blocks.

Blocks are shared between sequences with copy-on-write.

## Speculative decoding

A draft model proposes tokens.

```python
# not a heading inside a fence
x = 1
```
"""


def _lines_cover(path: Path, chunk) -> None:
    """The chunk's text really sits at its line range of the file."""
    lines = path.read_text().split("\n")[chunk.line_start - 1 : chunk.line_end]
    window = "\n".join(lines)
    for piece in chunk.text.split("\n"):
        if piece.strip():
            assert piece.strip().lstrip("# ") in window, (piece, chunk.line_start, chunk.line_end)


def test_markdown_headings_paragraphs_and_fences(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text(MARKDOWN)
    blocks = load(p).blocks
    headings = [b.text for b in blocks if b.is_heading]
    assert headings == ["Paged attention", "Speculative decoding"]  # the fenced "# ..." is code
    para = next(b for b in blocks if b.text.startswith("The KV cache"))
    assert (para.line_start, para.line_end, para.heading) == (3, 4, "Paged attention")
    chunks = chunk_blocks(blocks, size=120, overlap=0)
    assert chunks[0].text.startswith("Paged attention") and chunks[-1].heading == "Speculative decoding"
    assert not any("Paged attention" in c.text and "Speculative" in c.text for c in chunks)
    for c in chunks:
        _lines_cover(p, c)


def test_rst_and_code_blocks(tmp_path):
    rst = tmp_path / "guide.rst"
    rst.write_text("Install\n=======\n\nRun the installer.\n\nUsage\n-----\n\nCall ripe.\n")
    blocks = load(rst).blocks
    assert [b.text for b in blocks if b.is_heading] == ["Install", "Usage"]
    code = tmp_path / "mod.py"
    code.write_text("import os\n\n\ndef alpha():\n    return 1\n\n    # inner\n\n\nclass Beta:\n    pass\n")
    blocks = load(code).blocks
    assert [b.heading for b in blocks] == [None, "def alpha()", "class Beta"]
    alpha = blocks[1]
    assert (alpha.line_start, alpha.line_end) == (4, 7)  # a single blank line does not end a block


def test_html_text_and_source_lines(tmp_path):
    p = tmp_path / "page.html"
    p.write_text(
        "<html><head><title>T</title><style>p {color: red}</style></head>\n<body>\n<h1>Flash attention</h1>\n"
        "<p>Tiles of Q and K\nstay in SRAM.</p>\n<script>var x = 'no';</script>\n<p>Online softmax.</p>\n"
        "</body></html>\n"
    )
    blocks = load(p).blocks
    texts = [b.text for b in blocks]
    assert "Flash attention" in texts and "Online softmax." in texts
    assert not any("color" in t or "var x" in t for t in texts)
    tiles = next(b for b in blocks if b.text.startswith("Tiles"))
    assert (tiles.line_start, tiles.line_end, tiles.heading) == (4, 5, "Flash attention")


def test_pdf_pages_and_page_metadata(tmp_path):
    p = tmp_path / "paper.pdf"
    p.write_bytes(build_pdf([["Page one about paged attention.", "Second line."], ["Page two: drafts."]]))
    lf = load(p)
    assert lf.kind == "pdf"
    assert [(b.page, b.line_start, b.line_end) for b in lf.blocks] == [(1, 1, 2), (2, 1, 1)]
    chunks = chunk_blocks(lf.blocks)
    assert [c.page for c in chunks] == [1, 2]  # a chunk never crosses a page


def test_bad_files_are_skipped_with_reasons(tmp_path, monkeypatch):
    from pypdf import PdfWriter

    plain = tmp_path / "plain.pdf"
    plain.write_bytes(build_pdf([["secret text"]]))
    w = PdfWriter(clone_from=plain)
    w.encrypt("hunter2")
    enc = tmp_path / "locked.pdf"
    w.write(enc)
    cases = {
        enc: "encrypted",
        tmp_path / "blob.txt": "binary",
        tmp_path / "latin.md": "not UTF-8",
        tmp_path / "fake.pdf": "not a PDF",
        tmp_path / "broken.pdf": "broken PDF",
        tmp_path / "image.png": "unsupported",
    }
    (tmp_path / "blob.txt").write_bytes(b"abc\x00\x01\x02" * 10)
    (tmp_path / "latin.md").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "fake.pdf").write_bytes(b"just text")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    for path, reason in cases.items():
        with pytest.raises(SkipFile, match=reason):
            load(path)
    monkeypatch.setattr(loaders, "MAX_TEXT_BYTES", 10)
    big = tmp_path / "big.txt"
    big.write_text("x" * 100)
    with pytest.raises(SkipFile, match="too large"):
        load(big)


def test_pdf_parser_runs_under_a_time_limit(tmp_path):
    p = tmp_path / "slow.pdf"
    p.write_bytes(build_pdf([["text"]]))
    # a parser that cannot finish in time (here: not even start) is killed and the file skipped
    with pytest.raises(SkipFile, match="timed out"):
        pdf_pages.pdf_page_texts(p, wall_seconds=0.001)


def test_pdf_parser_runs_under_a_memory_cap(tmp_path, monkeypatch):
    p = tmp_path / "big.pdf"
    p.write_bytes(build_pdf([["text"]]))
    # 16 MB of address space cannot hold the interpreter plus pypdf: the parser fails, the file is skipped
    monkeypatch.setenv("RIPELM_PDF_MEMORY_MB", "16")
    with pytest.raises(SkipFile, match="memory or CPU limit"):
        pdf_pages.pdf_page_texts(p)
    monkeypatch.setenv("RIPELM_PDF_MEMORY_MB", "1536")
    assert [t.strip() for t in pdf_pages.pdf_page_texts(p)] == ["text"]


def test_chunk_size_overlap_and_long_paragraphs(tmp_path):
    paras = [f"Paragraph {i} " + " ".join(f"w{i}_{j}" for j in range(12)) + "." for i in range(12)]
    long = " ".join(f"Sentence {i} is here." for i in range(80))
    p = tmp_path / "doc.txt"
    p.write_text("\n\n".join(paras) + "\n\n" + long + "\n")
    chunks = chunk_blocks(load(p).blocks, size=600, overlap=150)
    assert all(len(c.text) <= 600 for c in chunks)
    # each chunk starts with what the previous one ended with: short paragraphs carried whole, and the
    # pieces of the cut paragraph overlapping by about 150 characters
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.text[:30] in a.text[-160:], (a.text[-160:], b.text[:30])
    for para in paras:
        assert any(para in c.text for c in chunks)
    assert sum("Sentence 40 is" in c.text for c in chunks) >= 1
    assert sum("Sentence" in c.text for c in chunks) >= 3  # the long paragraph was cut
    for c in chunks:
        _lines_cover(p, c)
    with pytest.raises(ValueError):
        chunk_blocks([], size=10)
