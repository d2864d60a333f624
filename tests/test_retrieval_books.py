""".docx and .epub loaders: files built here with python-docx and zipfile, headings respected by chunking,
damaged files skipped with a reason, and an index of a folder holding both next to broken ones."""

from __future__ import annotations

import zipfile
from pathlib import Path

import docx
import pytest
from retrieval_helpers import embedder_gguf, make_home

from ripelm.runtime.retrieval import book_loaders
from ripelm.runtime.retrieval.chunking import chunk_blocks
from ripelm.runtime.retrieval.errors import SkipFile
from ripelm.runtime.retrieval.loaders import SUPPORTED, load


def make_docx(path: Path) -> Path:
    d = docx.Document()
    d.add_heading("Paged attention", level=1)
    d.add_paragraph("The KV cache is split into fixed-size blocks. " * 12)
    d.add_paragraph("A block table maps logical blocks to physical ones. " * 10)
    d.add_heading("Speculative decoding", level=2)
    d.add_paragraph("A small draft model proposes tokens that the target verifies in one pass.")
    t = d.add_table(rows=2, cols=2)
    t.cell(0, 0).text, t.cell(0, 1).text = "draft length", "acceptance"
    t.cell(1, 0).text, t.cell(1, 1).text = "4", "0.7"
    d.save(path)
    return path


CONTAINER = """<?xml version="1.0"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
  <rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>
</container>"""

OPF = """<?xml version="1.0"?>
<package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id">
  <metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>Notes</dc:title></metadata>
  <manifest>
    <item id="c2" href="text/ch2.xhtml" media-type="application/xhtml+xml"/>
    <item id="c1" href="text/ch1.xhtml" media-type="application/xhtml+xml"/>
    <item id="css" href="style.css" media-type="text/css"/>
  </manifest>
  <spine><itemref idref="c1"/><itemref idref="c2"/></spine>
</package>"""


def chapter(title: str, body: str) -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
        f"<head><title>{title}</title></head>\n<body>\n<h1>{title}</h1>\n<p>{body}</p>\n"
        f"<h2>{title} details</h2>\n<p>More on {title.lower()}: {body}</p>\n</body></html>\n"
    )


def make_epub(path: Path, *, container: str = CONTAINER, opf: str = OPF, chapters: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        z.writestr("META-INF/container.xml", container)
        z.writestr("OEBPS/content.opf", opf)
        z.writestr("OEBPS/style.css", "p { margin: 0 }")
        if chapters:
            z.writestr(
                "OEBPS/text/ch1.xhtml", chapter("Quantization", "Weights are stored in four bits. " * 8)
            )
            z.writestr(
                "OEBPS/text/ch2.xhtml", chapter("Distillation", "A student learns from a teacher. " * 8)
            )
    return path


def test_docx_headings_paragraph_numbers_and_tables(tmp_path):
    f = load(make_docx(tmp_path / "notes.docx"))
    assert f.kind == "docx" and ".docx" in SUPPORTED
    heads = [b.text for b in f.blocks if b.is_heading]
    assert heads == ["Paged attention", "Speculative decoding"]
    table = f.blocks[-1]
    assert table.text == "draft length | acceptance\n4 | 0.7" and table.heading == "Speculative decoding"
    assert [b.line_start for b in f.blocks] == [1, 2, 3, 4, 5, 6]  # paragraph numbers, the table's rows
    chunks = chunk_blocks(f.blocks, 400, 60)
    assert len(chunks) >= 4
    for c in chunks:  # a chunk never straddles two sections and knows its heading
        assert c.heading in ("Paged attention", "Speculative decoding")
        assert not ("KV cache" in c.text and "draft" in c.text)
    assert chunks[-1].heading == "Speculative decoding" and "0.7" in chunks[-1].text


def test_epub_chapters_in_spine_order_with_headings(tmp_path):
    f = load(make_epub(tmp_path / "book.epub"))
    assert f.kind == "epub"
    assert [b.text for b in f.blocks if b.is_heading and b.page == 1][:2] == ["Quantization", "Quantization"]
    assert {b.page for b in f.blocks} == {1, 2}  # ch1 first, as the spine says (the manifest lists ch2 first)
    assert "four bits" in next(b.text for b in f.blocks if b.page == 1 and not b.is_heading)
    chunks = chunk_blocks(f.blocks, 300, 40)
    assert all(c.page in (1, 2) for c in chunks)
    assert not any("four bits" in c.text and "teacher" in c.text for c in chunks)  # never across chapters
    details = [c for c in chunks if c.heading == "Distillation details"]
    assert details and all(c.page == 2 for c in details)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("random.docx", b"PK\x03\x04 not really a zip" * 10, "not a zip archive"),
        ("old.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 500, "encrypted file or an old binary"),
        ("random.epub", b"\x00\x01garbage" * 50, "not a zip archive"),
    ],
)
def test_non_zip_files_are_skipped_with_a_reason(tmp_path, name, content, reason):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(SkipFile, match=reason):
        load(p)


def test_damaged_books_are_skipped_with_a_reason(tmp_path, monkeypatch):
    good = make_docx(tmp_path / "good.docx").read_bytes()
    cut = tmp_path / "cut.docx"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(SkipFile, match="docx"):
        load(cut)
    no_body = tmp_path / "nobody.docx"
    with zipfile.ZipFile(tmp_path / "good.docx") as src, zipfile.ZipFile(no_body, "w") as dst:
        for item in src.infolist():
            if item.filename != "word/document.xml":
                dst.writestr(item, src.read(item))
    with pytest.raises(SkipFile, match="damaged .docx"):
        load(no_body)
    with pytest.raises(SkipFile, match="no META-INF/container.xml"):
        load(_without(tmp_path, "META-INF/container.xml"))
    with pytest.raises(SkipFile, match="content.opf"):
        load(make_epub(tmp_path / "b.epub", opf="<package><unclosed></package>"))
    with pytest.raises(SkipFile, match="chapter OEBPS/text/ch1.xhtml is missing"):
        load(make_epub(tmp_path / "c.epub", chapters=False))
    with pytest.raises(SkipFile, match="names no package file"):
        load(make_epub(tmp_path / "d.epub", container=CONTAINER.replace("full-path", "x")))
    monkeypatch.setattr(book_loaders, "MAX_UNZIPPED_BYTES", 1000)  # a zip bomb, in miniature
    with pytest.raises(SkipFile, match="unpacks to"):
        load(tmp_path / "good.docx")


def _without(tmp_path: Path, member: str) -> Path:
    src = make_epub(tmp_path / "full.epub")
    out = tmp_path / "missing.epub"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(out, "w") as b:
        for item in a.infolist():
            if item.filename != member:
                b.writestr(item, a.read(item))
    return out


def test_index_a_folder_of_books_with_broken_ones(tmp_path):
    from ripelm.runtime.retrieval.embedder import Embedder
    from ripelm.runtime.retrieval.indexer import Indexer
    from ripelm.runtime.retrieval.search import Searcher
    from ripelm.runtime.retrieval.store import Store

    home = make_home(tmp_path / "home")
    root = tmp_path / "library"
    root.mkdir()
    make_docx(root / "notes.docx")
    make_epub(root / "book.epub")
    (root / "broken.docx").write_bytes(b"not a document")
    (root / "broken.epub").write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip: no container
    emb = Embedder(embedder_gguf(home), name="all-minilm:l6-v2", workers=1)
    try:
        with Store(tmp_path / "r.db") as st:
            i = emb.info
            c = st.create_collection(
                "b",
                embedder=i.name,
                embedder_path=str(emb.path),
                fingerprint=i.fingerprint,
                dim=i.dim,
                matryoshka=i.matryoshka,
                chunk_size=800,
                chunk_overlap=120,
            )
            rep = Indexer(st, c, emb).run([root])
            assert rep.indexed == 2
            reasons = dict((Path(p).name, r) for p, r in rep.skipped)
            assert set(reasons) == {"broken.docx", "broken.epub"}
            assert "not a zip" in reasons["broken.docx"] and "container" in reasons["broken.epub"]
            s = Searcher(st, st.get_collection("b"), emb)
            hit = s.search("who learns from a teacher?", top_k=1)[0]
            assert hit.chunk.path.endswith("book.epub") and hit.chunk.page == 2
            hit = s.search("block table logical physical", top_k=1)[0]
            assert hit.chunk.path.endswith("notes.docx") and hit.chunk.heading == "Paged attention"
    finally:
        emb.close()
