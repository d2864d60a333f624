"""Fuzzing the GGUF validator and loader: every malformed input loads or is rejected with a named error.

Two sources of inputs: a mutation corpus built at test time from real GGUF files (tiny models written by
gguf.GGUFWriter and llama.cpp's quantizer, plus the bundled SmolLM2 model's header on a sparse file of the
real size), and Hypothesis strategies that write files from scratch (tests/gguf_strategies.py). The default
suite runs a few hundred cases in seconds; `pytest -m fuzz tests/test_fuzz_gguf.py -s` runs the long
campaign (RIPELM_FUZZ_CASES, default 10,000 mutations, plus RIPELM_FUZZ_EXAMPLES Hypothesis examples) and
prints its figures: cases, outcomes, crashes, hangs and the slowest case.
"""

from __future__ import annotations

import json
import os
import random
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from gguf_factory import build_tiny_model, find_bundled_model
from gguf_mutations import HANG_SECONDS, MUTATORS, CaseHang, field_map, message_names_problem, run_case
from gguf_strategies import model_gguf, raw_gguf
from hypothesis import HealthCheck, given, settings
from small_vocab import small_vocab_source

from ripelm.models.gguf_file import open_gguf

# (arch, qtype, hidden, layers, tied): shapes chosen so each type takes its real load path (int4, split
# Q8_0, dense); the 256-block types get one layer, so a clean load stays well under the hang limit.
TINY_SEEDS = (
    ("llama", "Q4_0", 64, 2, True),
    ("llama", "Q4_1", 64, 2, False),
    ("qwen2", "Q8_0", 64, 2, True),
    ("qwen3", "F16", 64, 2, True),
    ("llama", "TQ2_0", 256, 1, True),
    ("llama", "Q4_K", 256, 1, False),
)


@dataclass
class Seed:
    name: str
    data: bytes  # the file, or for a big file its head (everything before the tensor data)
    full_size: int  # the real file's size; a head is padded back to it with a sparse hole

    @property
    def is_head(self) -> bool:
        return self.full_size > len(self.data)


@dataclass
class Campaign:
    """Figures of one fuzz run."""

    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_mutator: Counter = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    vague: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")

    def summary(self) -> dict:
        return {
            "cases": self.cases,
            "outcomes": dict(self.outcomes),
            "by_mutator": dict(self.by_mutator),
            "crashes": len(self.crashes),
            "hangs_over_2s": len(self.hangs),
            "vague_messages": len(self.vague),
            "slowest_s": round(self.slowest[0], 3),
            "slowest_case": self.slowest[1],
        }


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    d = tmp_path_factory.mktemp("fuzz_seeds")
    vocab = small_vocab_source(d / "vocab.gguf", 40)
    out = []
    for arch, qtype, hidden, layers, tied in TINY_SEEDS:
        p = build_tiny_model(
            d / f"{arch}-{qtype}.gguf", arch=arch, qtype=qtype, hidden=hidden, ffn=max(hidden, 128),
            n_layers=layers, n_heads=4, n_kv_heads=2, tied=tied, context_length=128, vocab_from=vocab,
        )  # fmt: skip
        data = p.read_bytes()
        out.append(Seed(p.name, data, len(data)))
    bundled = find_bundled_model()
    if bundled is not None:
        g = open_gguf(bundled)
        with open(bundled, "rb") as f:
            head = f.read(g.data_offset)
        out.append(Seed(bundled.name, head, g.file_size))
        g.close()
    return out


def write_case(path: Path, seed: Seed, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if seed.is_head and len(data) >= len(seed.data):
            f.truncate(seed.full_size + len(data) - len(seed.data))  # a sparse hole stands for the tensors


def check(path: Path, label: str, camp: Campaign) -> None:
    """Run one case and file its outcome in the campaign (crashes are recorded, not raised)."""
    camp.cases += 1
    try:
        res = run_case(path)
    except CaseHang as e:
        camp.hangs.append(f"{label}: {e}")
        return
    except Exception:
        camp.crashes.append(f"{label}:\n{traceback.format_exc()}")
        return
    camp.outcomes[res.kind] += 1
    if res.seconds > camp.slowest[0]:
        camp.slowest = (res.seconds, label)
    if res.seconds > HANG_SECONDS:
        camp.hangs.append(f"{label}: {res.seconds:.2f} s")
    if res.kind != "ok" and not message_names_problem(res.message, path):
        camp.vague.append(f"{label}: {res.message!r}")


def mutation_campaign(seeds: list[Seed], n_cases: int, rng_seed: int, tmp: Path) -> Campaign:
    rng = random.Random(rng_seed)
    maps = [field_map(s.data) for s in seeds]
    camp = Campaign()
    path = tmp / "case.gguf"
    for i in range(n_cases):
        k = rng.randrange(len(seeds))
        mutator = MUTATORS[i % len(MUTATORS)]
        data = mutator(rng, maps[k])
        write_case(path, seeds[k], data)
        camp.by_mutator[mutator.__name__] += 1
        check(path, f"case {i} {mutator.__name__} on {seeds[k].name} (rng seed {rng_seed})", camp)
    return camp


def assert_clean(camp: Campaign) -> None:
    assert not camp.crashes, f"{len(camp.crashes)} crashes, first:\n{camp.crashes[0]}"
    assert not camp.hangs, f"{len(camp.hangs)} cases over {HANG_SECONDS} s: {camp.hangs[:5]}"
    assert not camp.vague, f"rejections that do not say what is wrong: {camp.vague[:5]}"


def report(name: str, camp: Campaign) -> None:
    summary = camp.summary()
    print(f"\n{name}: {json.dumps(summary)}")
    where = os.environ.get("RIPELM_FUZZ_REPORT")
    if where:
        with open(where, "a") as f:
            f.write(json.dumps({"run": name, **summary}) + "\n")


# -- the bounded runs (default suite) ------------------------------------------------------------------------


def test_seeds_load(seeds: list[Seed], tmp_path: Path) -> None:
    """The corpus starts from files that load, so every rejection is the mutation's doing."""
    assert len(seeds) >= len(TINY_SEEDS)
    for s in seeds:
        p = tmp_path / s.name
        write_case(p, s, s.data)
        assert run_case(p).kind == "ok", s.name


def test_field_map_finds_every_region(seeds: list[Seed]) -> None:
    for s in seeds:
        fm = field_map(s.data)
        g_kvs, g_tensors = len(fm.kvs), len(fm.tensors)
        assert g_kvs >= 5 and g_tensors >= 9
        assert fm.header_end <= fm.data_offset < fm.header_end + fm.alignment
        kinds = {f.kind for f in fm.fields}
        assert {"count", "strlen", "vtype", "arrlen", "ndims", "dim", "ttype", "toffset", "value"} <= kinds


def test_truncation_at_every_boundary(seeds: list[Seed], tmp_path: Path) -> None:
    camp = Campaign()
    for s in seeds[:3]:
        fm = field_map(s.data)
        for cut in fm.boundaries()[:-1]:
            write_case(tmp_path / "cut.gguf", Seed(s.name, s.data, len(s.data)), s.data[:cut])
            check(tmp_path / "cut.gguf", f"{s.name} cut at {cut}", camp)
    assert_clean(camp)
    assert camp.outcomes["format"] >= camp.cases - 3  # only a cut in the padding after the last tensor loads


def test_mutation_corpus_bounded(seeds: list[Seed], tmp_path: Path) -> None:
    camp = mutation_campaign(seeds, 330, rng_seed=8, tmp=tmp_path)
    report("mutation (bounded)", camp)
    assert_clean(camp)
    assert camp.outcomes["format"] > camp.cases // 2  # most mutations must be caught


_HYP = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _hypothesis_case(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "hyp.gguf"
    p.write_bytes(data)
    res = run_case(p)  # any other exception fails the test (and Hypothesis shrinks the input)
    assert res.seconds <= HANG_SECONDS, res
    if res.kind != "ok":
        assert message_names_problem(res.message, p), res.message


@_HYP
@given(data=raw_gguf())
def test_hypothesis_raw_layouts(tmp_path: Path, data: bytes) -> None:
    _hypothesis_case(tmp_path, data)


@_HYP
@given(data=model_gguf())
def test_hypothesis_model_files(tmp_path: Path, data: bytes) -> None:
    _hypothesis_case(tmp_path, data)


# -- the long campaign (pytest -m fuzz) ----------------------------------------------------------------------

LONG_CASES = int(os.environ.get("RIPELM_FUZZ_CASES", "10000"))
LONG_EXAMPLES = int(os.environ.get("RIPELM_FUZZ_EXAMPLES", "2000"))
_HYP_LONG = settings(_HYP, max_examples=LONG_EXAMPLES)


@pytest.mark.fuzz
def test_mutation_corpus_long(seeds: list[Seed], tmp_path: Path) -> None:
    camp = mutation_campaign(seeds, LONG_CASES, rng_seed=int(os.environ.get("RIPELM_FUZZ_SEED", "2026")),
                             tmp=tmp_path)  # fmt: skip
    report("mutation (long)", camp)
    assert_clean(camp)


@pytest.mark.fuzz
@_HYP_LONG
@given(data=raw_gguf())
def test_hypothesis_raw_layouts_long(tmp_path: Path, data: bytes) -> None:
    _hypothesis_case(tmp_path, data)


@pytest.mark.fuzz
@_HYP_LONG
@given(data=model_gguf())
def test_hypothesis_model_files_long(tmp_path: Path, data: bytes) -> None:
    _hypothesis_case(tmp_path, data)
