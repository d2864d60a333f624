"""Prompt assembly and citation handling for `ripe ask`."""

from __future__ import annotations

from ripelm.doc_qa import CitationFilter, Source, build_messages, cited_numbers, sources_footer

SOURCES = [
    Source(1, "/d/a.md:3-9", "/d/a.md", 3, 9, None, "Paged attention\nuses blocks."),
    Source(2, "/d/p.pdf (p. 2, lines 1-4)", "/d/p.pdf", 1, 4, 2, "Drafts are verified."),
]


def test_messages_number_the_sources_without_paths():
    msgs = build_messages("  What are blocks? ", SOURCES)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "[1] Paged attention uses blocks." in user and "[2] Drafts are verified." in user
    assert "/d/a.md" not in user and "What are blocks?" in user


def test_filter_drops_citations_of_missing_sources_across_chunk_boundaries():
    f = CitationFilter({1, 2})
    pieces = ["Blocks [", "1] and drafts [2", "]. Not [7", "] this, arrays [x] and [12", "3] stay."]
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    assert out == "Blocks [1] and drafts [2]. Not  this, arrays [x] and  stay."
    assert f.dropped == ["[7]", "[123]"]
    assert cited_numbers(out) == [1, 2]
    tail = CitationFilter({1})
    assert tail.feed("end [") == "end " and tail.flush() == "["


def test_footer_lists_cited_sources_or_all():
    assert sources_footer(SOURCES, [2]) == "Sources:\n  [2] /d/p.pdf (p. 2, lines 1-4)"
    assert sources_footer(SOURCES, []).startswith("Sources (retrieved):\n  [1] /d/a.md:3-9\n  [2]")
