"""Prompt lookup (`NgramProposer`): what it proposes, against a brute-force search, as tokens grow."""

from __future__ import annotations

import random

import pytest

from ripelm.runtime.proposer import NgramProposer


def brute_force(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The latest earlier occurrence of the longest suffix (max_n..min_n tokens) and what followed it, by
    scanning the whole sequence; past the end it continues with the proposal itself."""
    length = len(tokens)
    for n in range(min(max_n, length), min_n - 1, -1):
        suffix = tokens[length - n :]
        for e in range(length - 1, n - 1, -1):
            if tokens[e - n : e] == suffix:
                out: list[int] = []
                for j in range(k):
                    out.append(tokens[e + j] if e + j < length else out[e + j - length])
                return out
    return []


def test_proposes_what_followed_the_latest_occurrence_of_the_suffix():
    p = NgramProposer(max_n=3, min_n=1)
    tokens = [5, 6, 7, 8, 9, 1, 5, 6, 7, 4, 4, 2, 5, 6, 7]
    # [5, 6, 7] occurred twice before; the later one was followed by 4, 4, 2
    assert p.propose(tokens, 3) == [4, 4, 2]
    assert p.propose(tokens, 1) == [4]


def test_the_longest_matching_suffix_wins():
    p = NgramProposer(max_n=3, min_n=1)
    # [3] alone last occurred before 9; [2, 3] before 7: the 2-gram decides
    tokens = [2, 3, 7, 1, 3, 9, 0, 2, 3]
    assert p.propose(tokens, 2) == [7, 1]


def test_no_match_proposes_nothing_and_min_n_is_respected():
    assert NgramProposer().propose([1, 2, 3, 4], 4) == []
    # the last token 1 occurred before, but only 1-grams match and min_n is 2
    assert NgramProposer(max_n=3, min_n=2).propose([1, 8, 9, 1], 4) == []
    assert NgramProposer(max_n=3, min_n=1).propose([1, 8, 9, 1], 4) == [8, 9, 1, 8]


def test_a_repeating_pattern_continues_past_the_end_of_the_sequence():
    p = NgramProposer(max_n=2, min_n=1)
    assert p.propose([4, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert p.propose([7, 7], 3) == [7, 7, 7]


def test_k_zero_and_short_sequences():
    p = NgramProposer()
    assert p.propose([], 4) == []
    assert p.propose([3], 4) == []
    assert p.propose([3, 3], 0) == []


@pytest.mark.parametrize("max_n,min_n", [(3, 1), (4, 2), (1, 1)])
def test_incremental_index_matches_brute_force_as_tokens_grow(max_n, min_n):
    """Tokens from a small vocabulary (many matches) appended in chunks of random size, as accepted
    speculative tokens are; every proposal equals the full scan's."""
    rng = random.Random(max_n * 10 + min_n)
    for _ in range(20):
        p = NgramProposer(max_n=max_n, min_n=min_n)
        tokens = [rng.randrange(6) for _ in range(rng.randrange(0, 30))]
        hits = 0
        for _ in range(40):
            k = rng.randrange(0, 6)
            got = p.propose(tokens, k)
            assert got == brute_force(tokens, k, max_n, min_n), (tokens, k)
            hits += bool(got)
            tokens += [rng.randrange(6) for _ in range(rng.randrange(1, 5))]
        assert hits > 10


def test_shrunk_tokens_rebuild_the_index():
    p = NgramProposer(max_n=2, min_n=1)
    assert p.propose([1, 2, 3, 1, 2], 1) == [3]
    # a different, shorter sequence: nothing of the old index may leak into the answer
    assert p.propose([1, 9, 1], 2) == [9, 1]
    assert p.propose([5, 6], 2) == []


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        NgramProposer(max_n=1, min_n=2)
    with pytest.raises(ValueError):
        NgramProposer(max_n=2, min_n=0)
