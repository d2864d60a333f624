"""Proposers for speculative decoding inside the engine: guesses of a sequence's next tokens.

A `Proposer` belongs to one sequence and is asked, at a decode step, for up to k tokens that may follow the
sequence's tokens (prompt plus everything generated). The engine's target forward then checks the guesses
(`spec_verify`); a proposer only affects speed, never output.

`NgramProposer` is prompt lookup (as in llama.cpp's lookup decoding and vLLM's n-gram proposer): it finds
the most recent earlier occurrence of the sequence's last n tokens (n from `max_n` down to `min_n`, the
longest match wins) and proposes the tokens that followed it. It pays where the answer repeats its context:
document Q&A, summaries, code edits. The guesses are a deterministic function of the tokens, so as a draft
distribution each one is a point mass (probability 1 on the proposed token).

Cost: the proposer keeps, per n, a dict from each n-gram to the end of its latest occurrence, extended
incrementally with the tokens appended since the last call, so a step costs O(new tokens x max_n), never a
scan of the whole prompt. The sequence's tokens must only grow between calls (accepted tokens are appended;
rejected proposals never enter them); if they shrink the index is rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Proposer(Protocol):
    name: str

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens guessed to follow `tokens` (possibly none)."""
        ...


class DraftModelProposer:
    """The engine's draft model proposes for this sequence: batched with every other sequence that drafts,
    by `runtime.draft_runner.DraftRunner`, so there is nothing to compute per sequence here."""

    name = "draft"
    batched = True

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        raise RuntimeError("draft-model proposals are made for the whole batch by the engine's DraftRunner")


class NgramProposer:
    """Prompt lookup over one sequence's tokens (see the module docstring)."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}..{max_n}")
        self.max_n, self.min_n = max_n, min_n
        self._reset()

    def _reset(self) -> None:
        # _index[n - min_n]: n-gram -> e, the end (exclusive) of its latest occurrence that has a continuation
        # (tokens[e] exists). Ends 1.._upto are indexed.
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.min_n, self.max_n + 1)]
        self._upto = 0
        self._length = 0

    def _extend(self, tokens: Sequence[int]) -> None:
        length = len(tokens)
        if length < self._length:
            self._reset()
        # An n-gram ending at e < length has its continuation tokens[e]; the one ending at `length` (the
        # suffix being looked up) does not and is indexed on a later call, once a token follows it.
        for e in range(self._upto + 1, length):
            for n, index in enumerate(self._index, start=self.min_n):
                if e >= n:
                    index[tuple(tokens[e - n : e])] = e
        self._upto = max(self._upto, length - 1)
        self._length = length

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        self._extend(tokens)
        length = len(tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            e = self._index[n - self.min_n].get(tuple(tokens[length - n :]))
            if e is None:
                continue
            # Copy what followed the match. When the match is recent its continuation runs into the end of
            # the sequence; it then continues with the proposal itself (a repeating pattern keeps repeating).
            out: list[int] = []
            for j in range(k):
                pos = e + j
                out.append(tokens[pos] if pos < length else out[pos - length])
            return out
        return []
