"""A draft model inside the engine: proposals for every speculating sequence of a decode step, batched.

The draft runs in the engine thread on its own paged pool (`PagedKVCache` with its own allocator, prefix
cache and native runner), sized in tokens like the target's. Each sequence that speculates with the draft
has a draft block table beside its target one (`Sequence.draft_table`, `Sequence.draft_ids` the tokens its
K/V hold). At a decode step `propose` takes every such sequence with the number of tokens the scheduler
allows it, and runs k draft forwards for all of them together:

- the first forward feeds each sequence what its draft cache lacks (after a round: the accepted tokens and
  the target's token; at the first round: the prompt, less what the draft's prefix cache holds; a row per
  token, on the native step, like a verify pass) and reads the logits at each sequence's last token;
- each later forward feeds one row per sequence still drafting: its newest proposed token.

A proposed token is the draft's argmax (greedy requests) or a draw from the draft's distribution under the
request's own sampling settings (`token_probs`, as the target's is computed), kept as `Sequence.draft_q`
for the exact acceptance rule. A sequence stops drafting early when the draft's top probability falls below
its policy's `min_confidence`. Rejected proposals are rolled back lazily: the next `propose` truncates the
draft table to the longest prefix it shares with the sequence's tokens. `release` frees a sequence's draft
blocks (finish, cancel, preemption), so both pools are freed in the same engine step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ripelm.runtime.kv_cache import paged_cache_for
from ripelm.runtime.model import Transformer
from ripelm.runtime.sampling import penalized_logits, token_probs
from ripelm.runtime.sequence import Sequence
from ripelm.runtime.step_forward import StepForward


class DraftRunner:
    def __init__(self, model: Transformer, *, num_blocks: int, block_size: int, hash_fn, vocab: int):  # noqa: ANN001
        native = getattr(model, "native", None)
        self.model = model
        self.vocab = vocab  # the target's: the draft's rows past it (if any) are never proposed
        self.cache = paged_cache_for(model, num_blocks, block_size, hash_fn)
        self.allocator = self.cache.allocator
        self.forward = StepForward(model, self.cache, native.runner(self.cache) if native else None, None)

    def release(self, seq: Sequence) -> None:
        """Free the sequence's draft blocks (its full blocks stay in the draft's prefix cache)."""
        self.allocator.free(seq.draft_table)
        seq.draft_ids = []

    def _sync(self, seq: Sequence, need: int) -> bool:
        """Roll the draft table back to what it shares with seq.tokens and make room for `need` positions;
        False if the draft pool cannot hold them (the sequence then proposes nothing this step)."""
        a, t, toks, ids = self.allocator, seq.draft_table, seq.tokens, seq.draft_ids
        if t.num_tokens == 0:
            a.free(t)
            seq.draft_table = t = a.match_prefix(toks, limit=len(toks) - 1)
            seq.draft_ids = ids = list(toks[: t.num_tokens])
        else:
            same = min(len(ids), len(toks) - 1)
            for i in range(seq.draft_synced, same):
                if ids[i] != toks[i]:
                    same = i
                    break
            if same < t.num_tokens:
                a.truncate(t, same)
                del ids[same:]
        seq.draft_synced = len(toks)  # after this round draft_ids start with all of toks
        if a.blocks_needed(t, need) > a.num_free:
            return False
        a.reserve(t, need)
        return True

    def prefill(self, seq: Sequence) -> None:
        """Compute the draft's K/V of the prompt beside the target's prefill (what its prefix cache lacks),
        so that the first proposal, like every later one, feeds only the newest tokens."""
        if not self._sync(seq, len(seq.tokens)):
            return  # no room now: the first proposal catches up instead
        t = seq.draft_table
        feed = seq.tokens[t.num_tokens :]
        start, n = t.num_tokens, len(feed)
        self.forward.rows(feed, list(range(start, start + n)), [t.blocks] * n, [n - 1])
        self.allocator.commit(t, feed)
        seq.draft_ids += feed

    def propose(self, wants: list[tuple[Sequence, int]]) -> dict[int, list[int]]:
        """Proposed tokens per sequence id (up to each one's k), from k batched draft forwards. Each
        sequence's draft_q is set to the distributions its proposals were drawn from (None when greedy)."""
        active: list[tuple[Sequence, int]] = []
        for seq, k in wants:
            seq.draft_q = None
            if k > 0 and self._sync(seq, len(seq.tokens) + k - 1):
                active.append((seq, k))
        out: dict[int, list[int]] = {seq.id: [] for seq, _ in wants}
        qs: dict[int, list[torch.Tensor]] = {seq.id: [] for seq, _ in active}
        feeds = {seq.id: seq.tokens[seq.draft_table.num_tokens :] for seq, _ in active}
        forwards, t0 = 0, time.perf_counter()
        consumed = {seq.id: 0 for seq, _ in active}  # proposed tokens fed to a constrained sequence's matcher
        while active:
            tokens: list[int] = []
            positions: list[int] = []
            tables: list[list[int]] = []
            last: list[int] = []
            for seq, _ in active:
                feed, start = feeds[seq.id], seq.draft_table.num_tokens
                tokens += feed
                positions += range(start, start + len(feed))
                tables += [seq.draft_table.blocks] * len(feed)
                last.append(len(tokens) - 1)
            logits = self.forward.rows(tokens, positions, tables, last)[:, : self.vocab]
            forwards += 1
            still: list[tuple[Sequence, int]] = []
            for i, (seq, k) in enumerate(active):
                feed = feeds[seq.id]
                self.allocator.commit(seq.draft_table, feed)
                seq.draft_ids += feed
                row = logits[i]
                if seq.constraint is not None:  # drawn under the grammar's mask after the tokens so far
                    if out[seq.id] and seq.constraint.look_ahead(out[seq.id][-1]):
                        consumed[seq.id] += 1
                    row = seq.constraint.apply(row)
                tok, conf, q = self._choose(seq, out[seq.id], row)
                threshold = seq.controller.policy.min_confidence if seq.controller is not None else 0.0
                if conf < threshold and out[seq.id]:
                    continue
                out[seq.id].append(tok)
                if q is not None:
                    qs[seq.id].append(q)
                if len(out[seq.id]) < k:
                    feeds[seq.id] = [tok]
                    still.append((seq, k))
            active = still
        per_forward = (time.perf_counter() - t0) / forwards if forwards else 0.0
        for seq, _ in wants:
            if consumed.get(seq.id):
                seq.constraint.rollback(consumed[seq.id])
            if out[seq.id]:
                if seq.controller is not None:
                    seq.controller.record_draft(per_forward)
                if seq.id in qs and qs[seq.id]:
                    seq.draft_q = torch.stack(qs[seq.id])
            # reservations past what was written go back to the pool
            self.allocator.truncate(seq.draft_table, seq.draft_table.num_tokens)
        return out

    def _choose(self, seq: Sequence, drafted: list[int], logits: torch.Tensor):  # noqa: ANN202
        """(token, the draft's top probability, the distribution it was drawn from or None if greedy)."""
        params = seq.params
        hist = None
        if params.repetition_penalty != 1.0:
            hist = [seq.tokens[-params.repeat_last_n :] + drafted]
        if params.greedy:
            # numpy, not torch: a torch reduction over the vocabulary wakes OpenMP's threads, whose spinning
            # afterwards slows the native step's own threads on a small machine
            z = penalized_logits(logits, params, hist).numpy()
            top = int(z.argmax())
            return top, float(1.0 / np.exp(z - z[top]).sum()), None
        q = token_probs(logits, params, hist)
        tok = int(torch.multinomial(q, 1, generator=seq.sampler.generator))
        return tok, float(q.max()), q
