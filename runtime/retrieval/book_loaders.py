"""Word (.docx) and EPUB files -> text blocks with their headings, or SkipFile with a reason.

.docx is read with python-docx (MIT; the library made for the format): body paragraphs and tables in
document order, a paragraph styled "Title" or "Heading N" (or given an outline level) is a heading. A
.docx has no lines, so a block's "lines" are its paragraph numbers (1-based, tables count one paragraph
per row), which is what a citation ``file.docx:12-14`` then points at.

EPUB is a zip of XHTML chapters listed by an OPF package file. It is read with ``zipfile`` and the
standard library's XML parser for the container and package files, and each chapter in spine order goes
through the same HTML block parser as .html files (loaders.html_blocks), so h1-h6 become headings. A
block's ``page`` is its chapter's position in the spine, its lines are lines of the chapter's XHTML. Not
ebooklib: it is AGPL-licensed, and all it would add here is the OPF lookup, a dozen lines.

Both are zip files: before anything is parsed the archive's listed sizes are checked against a limit, so a
zip bomb is skipped instead of filling memory. A file that is not a zip (an old binary .doc renamed, a
password-protected .docx, which is an OLE container) or whose parts are missing or malformed is skipped
with the reason.
"""

from __future__ import annotations

import io
import posixpath
import re
import zipfile
from xml.etree import ElementTree

from ripelm.runtime.retrieval.errors import SkipFile

MAX_UNZIPPED_BYTES = 200 * 1024 * 1024
_HEADING_STYLE = re.compile(r"^(title|heading\s*\d*|subtitle)$", re.IGNORECASE)


def _zip(data: bytes, what: str) -> zipfile.ZipFile:
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        if data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
            raise SkipFile(f"not a readable {what} (an encrypted file or an old binary format)") from None
        raise SkipFile(f"not a readable {what} (not a zip archive; damaged?)") from None
    total = sum(i.file_size for i in z.infolist())
    if total > MAX_UNZIPPED_BYTES:
        raise SkipFile(f"{what} unpacks to {total / 1e6:.0f} MB (limit {MAX_UNZIPPED_BYTES / 1e6:.0f} MB)")
    return z


def docx_blocks(data: bytes) -> list:
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    from ripelm.runtime.retrieval.loaders import Block

    _zip(data, ".docx").close()
    try:
        doc = docx.Document(io.BytesIO(data))
        items = list(doc.iter_inner_content())
    except SkipFile:
        raise
    except Exception as e:  # python-docx raises KeyError, ValueError, lxml errors... for broken parts
        raise SkipFile(f"damaged .docx ({type(e).__name__}: {str(e)[:80]})") from None
    blocks: list[Block] = []
    heading: str | None = None
    line = 0
    for item in items:
        if isinstance(item, Paragraph):
            line += 1
            text = item.text.strip()
            if not text:
                continue
            if _is_heading(item):
                heading = " ".join(text.split())
                blocks.append(Block(text, line, line, heading=heading, is_heading=True))
            else:
                blocks.append(Block(text, line, line, heading=heading))
        elif isinstance(item, Table):
            start = line + 1
            rows = []
            for row in item.rows:
                line += 1
                cells = [c.text.strip() for c in row.cells]
                if any(cells):
                    rows.append(" | ".join(cells))
            if rows:
                blocks.append(Block("\n".join(rows), start, line, heading=heading))
    return blocks


def _is_heading(p) -> bool:
    try:
        name = p.style.name if p.style is not None else ""
    except (KeyError, ValueError):
        name = ""
    if name and _HEADING_STYLE.match(name.strip()):
        return True
    ppr = p._p.pPr
    return (
        ppr is not None
        and ppr.find("{http://schemas.openxmlformats.org/wordprocessingml/2006/main}outlineLvl") is not None
    )


_CONTAINER_NS = "{urn:oasis:names:tc:opendocument:xmlns:container}"
_OPF_NS = "{http://www.idpf.org/2007/opf}"


def _xml(z: zipfile.ZipFile, name: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(z.read(name))
    except KeyError:
        raise SkipFile(f"damaged .epub (no {name})") from None
    except ElementTree.ParseError as e:
        raise SkipFile(f"damaged .epub ({name}: {e})") from None


def epub_chapters(data: bytes) -> list[tuple[str, str]]:
    """(name, XHTML text) of the chapters in reading (spine) order."""
    z = _zip(data, ".epub")
    with z:
        root = _xml(z, "META-INF/container.xml")
        rootfile = root.find(f".//{_CONTAINER_NS}rootfile")
        opf_path = rootfile.get("full-path") if rootfile is not None else None
        if not opf_path:
            raise SkipFile("damaged .epub (its container names no package file)")
        opf = _xml(z, opf_path)
        base = posixpath.dirname(opf_path)
        manifest = {
            i.get("id"): i.get("href")
            for i in opf.iter(f"{_OPF_NS}item")
            if i.get("id") and i.get("href") and "html" in (i.get("media-type") or "")
        }
        out = []
        for ref in opf.iter(f"{_OPF_NS}itemref"):
            href = manifest.get(ref.get("idref"))
            if href is None:
                continue
            name = posixpath.normpath(posixpath.join(base, href.split("#")[0]))
            try:
                raw = z.read(name)
            except KeyError:
                raise SkipFile(f"damaged .epub (chapter {name} is missing)") from None
            except (zipfile.BadZipFile, OSError, EOFError) as e:  # a corrupt member (bad CRC, cut short)
                raise SkipFile(f"damaged .epub ({name}: {e})") from None
            out.append((name, raw.decode("utf-8", errors="replace")))
        if not out:
            raise SkipFile("damaged .epub (no chapters in its spine)")
        return out


def epub_blocks(data: bytes) -> list:
    from ripelm.runtime.retrieval.loaders import html_blocks

    blocks = []
    for n, (_name, text) in enumerate(epub_chapters(data), start=1):
        for b in html_blocks(text):
            b.page = n
            blocks.append(b)
    return blocks
