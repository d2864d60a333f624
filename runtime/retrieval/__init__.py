"""Document retrieval: load and chunk files, embed, store in SQLite, search (Matryoshka + BM25)."""
