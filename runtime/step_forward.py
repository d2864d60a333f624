"""One engine step's forward: a scheduler plan in, the logits its tokens call for out.

A plan is one prefill chunk or a decode step; a decode step has one row per sequence plus a row per proposed
token of a speculating sequence (`runtime.engine_spec`), each row a query at its own position with its
sequence's block table. Three paths compute it:
- the native CPU step (`runtime.native_decode`): every layer of every row in one call, the GIL released;
  it also takes short prefill chunks and recomputes preempted sequences (so a history gets the same K/V as
  when it was first decoded);
- on CUDA, decode steps replay CUDA graphs (`runtime.cuda_step`);
- otherwise torch: a decode row is a one-query entry of a `PagedBatch` (computed as a plain decode row is;
  the rows of one sequence see each other's K/V, which each layer writes before it attends), a prefill
  chunk one multi-query entry that stops between layers once its request is cancelled.
"""

from __future__ import annotations

import torch

from ripelm.kernels.paged_attention import PagedBatch
from ripelm.runtime.cuda_step import StaticDecode
from ripelm.runtime.kv_cache import PagedKVCache
from ripelm.runtime.model import Transformer
from ripelm.runtime.scheduler import StepPlan


def step_rows(plan: StepPlan, starts: list[int], new: list[list[int]]) -> tuple[list[int], list[int], list]:
    """The plan's rows flattened: token, position and block table of each, sequence by sequence."""
    tokens: list[int] = []
    positions: list[int] = []
    tables: list[list[int]] = []
    for seq, p, chunk in zip(plan.seqs, starts, new, strict=True):
        tokens += chunk
        positions += range(p, p + len(chunk))
        tables += [seq.table.blocks] * len(chunk)
    return tokens, positions, tables


def window_rows(cache: PagedKVCache, plan: StepPlan, new: list[list[int]]) -> list[list[int]] | None:
    """Each row's sliding-window layers' block table (as `step_rows` gives the others'), or None when the
    cache keeps the window layers in the same blocks."""
    if not cache.windowed:
        return None
    out: list[list[int]] = []
    for seq, chunk in zip(plan.seqs, new, strict=True):
        out += [cache.allocator.window_blocks(seq.table)] * len(chunk)
    return out


class StepForward:
    def __init__(self, model: Transformer, cache: PagedKVCache, native, static: StaticDecode | None):  # noqa: ANN001
        self.model, self.cache, self.native, self.static = model, cache, native, static

    def run(self, plan: StepPlan, starts: list[int], new: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        """(indices of the sequences whose logits are ready, logits): a prefill's one row per ready sequence,
        a decode step's every row of every sequence, in order."""
        rows = sum(plan.counts)
        if self.native is not None and (self.native.takes(rows) or plan.seqs[0].preemptions > 0):
            return self._native(plan, starts, new)
        if plan.kind == "decode":
            everyone = list(range(len(plan.seqs)))
            if self.static is not None and self.static.takes(rows):
                tokens, positions, tables = step_rows(plan, starts, new)
                x = self.model.embed(torch.tensor(tokens, dtype=torch.long)).float()
                return everyone, self.static.forward(x, positions, tables)
            return everyone, self._decode_torch(plan, starts, new)
        return self._prefill_torch(plan, starts, new)

    def _native(
        self, plan: StepPlan, starts: list[int], new: list[list[int]]
    ) -> tuple[list[int], torch.Tensor]:
        tokens, positions, tables = step_rows(plan, starts, new)
        ready: list[int] = []
        logit_rows: list[int] = []
        end = 0
        for i, (seq, p, chunk) in enumerate(zip(plan.seqs, starts, new, strict=True)):
            end += len(chunk)
            if plan.kind == "decode":  # all rows: the proposed tokens are checked against them
                ready.append(i)
                logit_rows.extend(range(end - len(chunk), end))
            elif p + len(chunk) == len(seq.tokens):
                ready.append(i)
                logit_rows.append(end - 1)
        # A long prefill chunk runs as several native steps; a cancel is acknowledged between them.
        interrupt = plan.seqs[0].request.cancel_requested.is_set if plan.kind == "prefill" else None
        x = self.model.embed(torch.tensor(tokens, dtype=torch.long))
        logits, _ = self.native.forward(
            x,
            positions,
            tables,
            logit_rows or [end - 1],
            interrupt=interrupt,
            window_tables=window_rows(self.cache, plan, new),
        )
        return ready, logits

    def rows(
        self, tokens: list[int], positions: list[int], tables: list[list[int]], logit_rows: list[int]
    ) -> torch.Tensor:
        """Logits at `logit_rows` of a forward over free-standing rows (each a token at its position with its
        block table; a sequence's rows in position order), on the native step when there is one, else as
        one-query entries of a torch paged batch. The draft model's steps run here."""
        if self.native is not None:
            x = self.model.embed(torch.tensor(tokens, dtype=torch.long))
            return self.native.forward(x, positions, tables, logit_rows)[0]
        return self._rows_torch(tokens, positions, tables, logit_rows)

    def _decode_torch(self, plan: StepPlan, starts: list[int], new: list[list[int]]) -> torch.Tensor:
        tokens, positions, tables = step_rows(plan, starts, new)
        window_tables = window_rows(self.cache, plan, new)
        return self._rows_torch(tokens, positions, tables, list(range(len(tokens))), window_tables)

    def _rows_torch(
        self,
        tokens: list[int],
        positions: list[int],
        tables: list[list[int]],
        logit_rows: list[int],
        window_tables: list[list[int]] | None = None,
    ) -> torch.Tensor:
        dev = self.model.device
        allocator = self.cache.allocator
        batch = PagedBatch(
            allocator.block_size,
            tables,
            [1] * len(tables),
            [p + 1 for p in positions],
            device=dev,
            num_blocks=allocator.num_blocks,
            window_tables=window_tables,
        )
        rows = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        t = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return self.model(t, pos, self.cache.step(batch), logits_rows=rows)

    def _prefill_torch(
        self, plan: StepPlan, starts: list[int], new: list[list[int]]
    ) -> tuple[list[int], torch.Tensor]:
        dev = self.model.device
        allocator = self.cache.allocator
        batch = PagedBatch(
            allocator.block_size,
            [s.table.blocks for s in plan.seqs],
            plan.counts,
            [p + c for p, c in zip(starts, plan.counts, strict=True)],
            device=dev,
            num_blocks=allocator.num_blocks,
            window_tables=(
                [allocator.window_blocks(s.table) for s in plan.seqs] if self.cache.windowed else None
            ),
        )
        tokens = torch.tensor([t for chunk in new for t in chunk], dtype=torch.long, device=dev)
        ready = [
            i
            for i, (s, p, c) in enumerate(zip(plan.seqs, starts, plan.counts, strict=True))
            if p + c == len(s.tokens)
        ]
        rows = torch.tensor(
            [batch.q_starts[i] + plan.counts[i] - 1 for i in ready] or [batch.num_rows - 1],
            dtype=torch.long,
            device=dev,
        )
        # A prefill chunk (one sequence, up to a few hundred ms) stops between layers once its request is
        # cancelled, so a cancel is acknowledged within about one layer's time.
        interrupt = plan.seqs[0].request.cancel_requested.is_set
        logits = self.model(tokens, starts[0], self.cache.step(batch), logits_rows=rows, interrupt=interrupt)
        return ready, logits
