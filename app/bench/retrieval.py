"""`ripe retrieval-eval` and `ripe retrieval-bench`: the retrieval numbers quoted in the docs, reproducible.

Both work in a throw-away store in a temporary folder, never in the user's collections.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ripelm.retrieval_cli import _open_embedder


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "retrieval-eval",
        help="measure retrieval quality (hit@5, MRR) on a question set",
        description="Index DOCS into a temporary collection, then run every question through BM25, dense, "
        "Matryoshka shortlist + rerank and hybrid search. Fusion settings are tuned on the odd-numbered "
        "questions and reported on the even-numbered ones as well as on all.",
    )
    ev.add_argument("questions", type=Path, help="JSON lines: id, question, file, quote, style")
    ev.add_argument("--docs", type=Path, required=True, help="folder holding the files the questions name")
    ev.add_argument("--embedder", default=None)

    be = sub.add_parser(
        "retrieval-bench",
        help="measure indexing speed, Matryoshka search at scale, and re-index times",
        description="Indexing chunks/s on DOCS (median of --runs), shortlist+rerank vs exact search on "
        "--vectors sampled vectors (recall@10, median latencies, memory bandwidth use, index memory), "
        "and first / unchanged / one-file-edited index times of a "
        "--tree-files file tree.",
    )
    be.add_argument("--docs", type=Path, required=True, help="real documents to embed (e.g. shared/seeds)")
    be.add_argument("--questions", type=Path, default=None, help="question set whose embeddings are queries")
    be.add_argument(
        "--stats-docs",
        type=Path,
        default=None,
        help="more real text for the vector statistics (default: the Python standard library)",
    )
    be.add_argument("--stats-chunks", type=int, default=1500, help="real chunks for the statistics")
    be.add_argument("--runs", type=int, default=3)
    be.add_argument(
        "--vectors", default="100000,1000000", help="sampled store sizes, comma-separated (default: 100k,1M)"
    )
    be.add_argument("--code-dim", type=int, default=None, help="int8 code prefix length (default 64)")
    be.add_argument("--queries", type=int, default=200)
    be.add_argument(
        "--shortlist",
        default="1000,2000,3000",
        help="shortlist sizes to try (search uses 1000 to 333k, then 0.3%%)",
    )
    be.add_argument("--tree-files", type=int, default=1000)
    be.add_argument("--skip", default="", help="comma-separated parts to skip: speed,scale,tree")
    be.add_argument("--embedder", default=None)


def _index(store_file: Path, name: str, paths: list[Path], emb, chunk_size: int = 800, overlap: int = 120):
    from ripelm.runtime.retrieval.indexer import Indexer
    from ripelm.runtime.retrieval.store import Store

    st = Store(store_file)
    c = st.find_collection(name) or st.create_collection(
        name,
        embedder=emb.info.name,
        embedder_path=str(emb.path),
        fingerprint=emb.info.fingerprint,
        dim=emb.dim,
        matryoshka=emb.info.matryoshka,
        chunk_size=chunk_size,
        chunk_overlap=overlap,
    )
    report = Indexer(st, c, emb).run(paths)
    return st, st.get_collection(name), report


def cmd_retrieval_eval(args: argparse.Namespace) -> int:
    from ripelm.bench import retrieval_eval as E
    from ripelm.runtime.retrieval.dense_index import DenseIndex
    from ripelm.runtime.retrieval.fusion import FusionParams
    from ripelm.runtime.retrieval.search import Searcher

    questions = E.load_questions(args.questions, args.docs)
    emb = _open_embedder(args.embedder)
    with tempfile.TemporaryDirectory() as tmp:
        st, c, rep = _index(Path(tmp) / "eval.db", "eval", [args.docs], emb)
        print(
            f"indexed {rep.indexed} files, {rep.chunks_total} chunks; {len(questions)} questions "
            f"({sum(q.style == 'paraphrase' for q in questions)} paraphrased)"
        )
        qv = emb.embed([q.question for q in questions], query=True)
        s = Searcher(st, c, emb)
        d8 = c.dim // 8
        few = max(10, rep.chunks_total // 10)
        rows: dict[str, E.Scores] = {
            "BM25 (FTS5)": E.run(s, questions, qv, mode="bm25"),
            f"dense, full {c.dim}-d exact": E.run(s, questions, qv, mode="dense"),
            f"Matryoshka {d8}-d PCA shortlist {few} -> {c.dim}-d rerank": E.run(
                s, questions, qv, mode="matryoshka", dim=d8, shortlist=few
            ),
        }
        pca_index = s.index
        s._index = DenseIndex(pca_index.ids, pca_index.full)  # plain truncation, for comparison
        rows[f"  same, raw {d8}-d prefix (no PCA)"] = E.run(
            s, questions, qv, mode="matryoshka", dim=d8, shortlist=few
        )
        for d in (d8, c.dim // 16):
            rows[f"  {d}-d prefix only, raw"] = E.run(
                s, questions, qv, mode="matryoshka", dim=d, shortlist=10
            )
            s._index = pca_index
            rows[f"  {d}-d prefix only, PCA"] = E.run(
                s, questions, qv, mode="matryoshka", dim=d, shortlist=10
            )
            s._index = DenseIndex(pca_index.ids, pca_index.full)
        s._index = pca_index
        rows["hybrid, plain RRF (k=60)"] = E.run(s, questions, qv, mode="hybrid", fusion=FusionParams("rrf"))
        # leave-one-out check of the weight choice: for each question, pick the weight that maximizes the
        # smaller of the hybrid's gains over the best single method (hit@5 and MRR) on the other questions
        bm25, dense = rows["BM25 (FTS5)"], rows[f"dense, full {c.dim}-d exact"]
        weights = [w / 10 for w in range(1, 10)]
        runs = {w: E.run(s, questions, qv, mode="hybrid", fusion=FusionParams("score", w)) for w in weights}
        held_out, picks = E.Scores(), []
        for i, q in enumerate(questions):

            def others(sc: E.Scores, i: int = i) -> E.Scores:
                return E.Scores(sc.hits[:i] + sc.hits[i + 1 :], sc.questions[:i] + sc.questions[i + 1 :])

            b, d = others(bm25), others(dense)
            best_hit, best_mrr = max(b.hit_at(5), d.hit_at(5)), max(b.mrr(), d.mrr())
            w = max(
                weights,
                key=lambda w: min(others(runs[w]).hit_at(5) - best_hit, others(runs[w]).mrr() - best_mrr),
            )
            picks.append(w)
            held_out.hits.append(runs[w].hits[i])
            held_out.questions.append(q)
        print(f"leave-one-out weight picks: {sorted(set(picks))}")
        default = FusionParams()
        rows[f"hybrid, default ({default.method}, w_dense={default.dense_weight})"] = E.run(
            s, questions, qv, mode="hybrid"
        )
        rows["hybrid, weight chosen leave-one-out"] = held_out
        st.close()
    emb.close()
    print()
    print(
        "| method | hit@5 all | MRR all | hit@5 test half | MRR test half | hit@5 paraphrased "
        "| hit@5 keyword |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, sc in rows.items():
        test = sc.subset(lambda q: q.split == "test")
        para = sc.subset(lambda q: q.style == "paraphrase")
        kw = sc.subset(lambda q: q.style == "keyword")
        print(
            f"| {name} | {sc.hit_at(5):.3f} | {sc.mrr():.3f} | {test.hit_at(5):.3f} | {test.mrr():.3f} | "
            f"{para.hit_at(5):.3f} | {kw.hit_at(5):.3f} |"
        )
    return 0


def _stats_texts(folder: Path | None, limit: int) -> list[str]:
    import sysconfig

    from ripelm.runtime.retrieval.chunking import chunk_blocks
    from ripelm.runtime.retrieval.errors import SkipFile
    from ripelm.runtime.retrieval.loaders import load

    root = folder or Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for f in sorted(root.rglob("*.py" if folder is None else "*")):
        if "test" in f.parts or not f.is_file():
            continue
        try:
            texts += [c.text for c in chunk_blocks(load(f).blocks)]
        except (SkipFile, ValueError):
            continue
        if len(texts) >= limit:
            break
    return texts[:limit]


def _tree(root: Path, n_files: int, docs: Path) -> None:
    """n_files small text files cut from the real documents (1-2 chunks each)."""
    text = " ".join(
        " ".join(p.read_text(encoding="utf-8", errors="replace").split()) for p in sorted(docs.glob("*.txt"))
    )
    step = max(1, (len(text) - 1200) // n_files)
    for i in range(n_files):
        sub = root / f"d{i // 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        piece = text[i * step : i * step + 600 + (i % 7) * 100]
        (sub / f"note{i:04d}.md").write_text(f"# Note {i}\n\n{piece}\n", encoding="utf-8")


def cmd_retrieval_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from ripelm.bench.retrieval_scale import memory_bandwidth, run_scale

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    emb = _open_embedder(args.embedder)
    out = sys.stdout
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if "speed" not in skip:
            reps = []
            for r in range(args.runs):
                st, c, rep = _index(tmpd / f"speed{r}.db", "speed", [args.docs], emb)
                st.close()
                reps.append(rep)
                print(
                    f"run {r + 1}: {rep.chunks_added} chunks, {rep.tokens} tokens in {rep.seconds:.2f} s "
                    f"(read+chunk {rep.read_seconds:.2f}, embed {rep.embed_seconds:.2f}, "
                    f"write {rep.write_seconds:.2f}, PCA {rep.rotation_seconds:.2f})",
                    file=out,
                )
            med = statistics.median(r.chunks_added / r.seconds for r in reps)
            tok = statistics.median(r.tokens / r.embed_seconds for r in reps)
            per_cpu = statistics.median(r.chunks_added / r.embed_cpu_seconds for r in reps)
            cores = len(emb._models)
            print(
                f"indexing: median {med:.1f} chunks/s end to end, {tok:.0f} tokens/s in the embedder "
                f"({cores} llama.cpp workers x 1 thread); {per_cpu:.1f} chunks per CPU-second, i.e. "
                f"{per_cpu * cores:.1f} chunks/s when {cores} cores are free\n",
                file=out,
            )
        if "scale" not in skip:
            t = time.perf_counter()
            texts = _stats_texts(args.stats_docs, args.stats_chunks)
            real = emb.embed(texts)
            st, c, rep = _index(tmpd / "q.db", "q", [args.docs], emb)
            _, seed_vecs = st.vectors(c)
            st.close()
            real = np.concatenate([real, seed_vecs.astype(np.float32)])
            print(
                f"statistics from {len(real)} real chunk vectors ({time.perf_counter() - t:.0f} s)", file=out
            )
            queries = np.zeros((0, emb.dim), np.float32)
            if args.questions:
                import json

                qs = [json.loads(x)["question"] for x in args.questions.read_text().splitlines() if x.strip()]
                queries = emb.embed(qs, query=True)
            blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
            print(f"BLAS threads: {blas} (set OPENBLAS_NUM_THREADS=1 on a busy machine)", file=out)
            bw = memory_bandwidth()
            print(f"memory bandwidth: {bw:.1f} GB/s (one-thread copy, read + write)", file=out)
            sizes = tuple(int(x) for x in args.shortlist.split(","))
            for n in (int(x) for x in str(args.vectors).split(",")):
                for r in run_scale(
                    real, queries, n=n, shortlists=sizes, n_queries=args.queries, prefix_dim=args.code_dim
                ):
                    print(
                        f"{r.n} vectors x {r.dim}-d: int8 {r.prefix_dim}-d PCA code shortlist of "
                        f"{r.shortlist} -> float16 full rerank, {r.queries} queries: "
                        f"recall@10 {r.recall_at_10:.4f}, "
                        f"median exact {r.exact_ms:.2f} ms vs shortlist {r.shortlist_ms:.2f} ms "
                        f"({r.speedup:.1f}x); exact reads {r.exact_gbps:.1f} GB/s = "
                        f"{100 * r.exact_gbps / bw:.0f}% of bandwidth; shortlist index {r.index_mb:.1f} MB "
                        f"(+ {r.full_mb:.0f} MB float16 full vectors, memory-mapped)",
                        file=out,
                    )
            print(file=out)
        if "tree" not in skip:
            root = tmpd / "tree"
            _tree(root, args.tree_files, args.docs)
            st, c, first = _index(tmpd / "tree.db", "tree", [root], emb)
            st.close()
            st, c, again = _index(tmpd / "tree.db", "tree", [root], emb)
            st.close()
            victim = sorted(root.rglob("*.md"))[args.tree_files // 2]
            victim.write_text(victim.read_text() + "\nAn edited line about paged attention.\n")
            st, c, edit = _index(tmpd / "tree.db", "tree", [root], emb)
            st.close()
            print(
                f"{args.tree_files}-file tree: first index {first.seconds:.1f} s "
                f"({first.chunks_added} chunks), "
                f"unchanged re-index {again.seconds:.2f} s ({100 * again.seconds / first.seconds:.1f}% of "
                f"first, {again.indexed} re-embedded), one file edited {edit.seconds:.2f} s "
                f"({edit.indexed} file / {edit.chunks_added} chunks re-embedded)",
                file=out,
            )
    emb.close()
    return 0


HANDLERS = {"retrieval-eval": cmd_retrieval_eval, "retrieval-bench": cmd_retrieval_bench}
