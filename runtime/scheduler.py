"""Continuous batching: which sequences the next forward computes.

Each step is either a prefill step (the next chunk of one sequence's prompt) or a decode step (one token
for every running sequence that has a single token left to compute). When both kinds are waiting they
alternate, so new prompts join the running batch within a step or two and decodes are never starved by
a queue of long prompts. Keeping the two kinds apart keeps each row's arithmetic the same as on the
single-sequence path (the packed int4 matmul gives a row the same result whatever else is in the
batch), so batched greedy output is token-for-token the single-sequence output.

Memory: a sequence is admitted only when its next chunk fits the pool (its cached prefix is shared, not
copied). When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed (full ones stay in the prefix cache) and it is recomputed later.

Speculation: a decode step may also verify proposed tokens (`Sequence.proposer`). Once every decoding
sequence has room for its own next position, the speculating ones (oldest first) get up to `spec_k` proposed
tokens each, within `max_rows` rows for the whole step (the native step's batch) and within the blocks
still free: the pool is reserved for those positions too, but proposals never preempt anyone or take the
room a plain decode row needs. The engine truncates the rejected positions away in the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ripelm.runtime import engine_spec
from ripelm.runtime.block_allocator import BlockAllocator
from ripelm.runtime.errors import KVPoolError
from ripelm.runtime.sequence import SeqStatus, Sequence


@dataclass
class StepPlan:
    kind: str  # "prefill" or "decode"
    seqs: list[Sequence]
    counts: list[int]  # tokens each sequence computes in this step (a decode: 1 + its proposed tokens)
    drafts: list[list[int]] = field(default_factory=list)  # decode: each sequence's proposed tokens


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        max_seqs: int,
        prefill_chunk: int,
        max_rows: int = 16,
        drafter=None,  # noqa: ANN001 - a runtime.draft_runner.DraftRunner
    ):
        self.allocator = allocator
        self.max_seqs = max_seqs
        self.prefill_chunk = prefill_chunk
        self.max_rows = max_rows  # rows of a decode step that verifies proposals
        self.drafter = drafter  # the engine's DraftRunner, if it has a draft model
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._order = 0
        self._last = "decode"
        self.failed: list[
            tuple[Sequence, Exception]
        ] = []  # sequences that can never fit; the engine ends them

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.table)
        self._release_draft(seq)
        seq.status = SeqStatus.FINISHED

    def _release_draft(self, seq: Sequence) -> None:
        if self.drafter is not None:
            self.drafter.release(seq)

    def schedule(self) -> StepPlan | None:
        decodable = any(s.remaining == 1 for s in self.running)
        if not (self._last == "prefill" and decodable):
            plan = self._plan_prefill()
            if plan is not None:
                self._last = "prefill"
                return plan
        plan = self._plan_decode()
        if plan is not None:
            self._last = "decode"
            return plan
        plan = self._plan_prefill()
        if plan is not None:
            self._last = "prefill"
        return plan

    # ---- prefill ----------------------------------------------------------------------------------
    def _plan_prefill(self) -> StepPlan | None:
        seq = next((s for s in self.running if s.remaining > 1), None)
        if seq is None:
            seq = self._admit()
            if seq is None:
                return None
        count = min(seq.remaining, self.prefill_chunk)
        if not self._make_room(seq, seq.table.num_tokens + count):
            return None
        self.allocator.reserve(seq.table, seq.table.num_tokens + count)
        return StepPlan("prefill", [seq], [count])

    def _admit(self) -> Sequence | None:
        """Start the oldest waiting sequence if its first chunk fits without preempting anyone."""
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            a = self.allocator
            if -(-len(seq.tokens) // a.block_size) > a.num_blocks:
                self.waiting.popleft()
                self.failed.append((seq, self._too_small(seq)))
                continue
            seq.table = a.match_prefix(seq.tokens, limit=len(seq.tokens) - 1)
            count = min(seq.remaining, self.prefill_chunk)
            # Leave a block per running sequence free, so admitting this one does not at once force a
            # preemption (and a recompute) as soon as the others cross a block boundary.
            margin = len(self.running)
            if a.blocks_needed(seq.table, seq.table.num_tokens + count) + margin > a.num_free:
                a.free(seq.table)  # keep waiting; decodes finishing will make room
                return None
            self.waiting.popleft()
            if seq.cached_tokens < 0:
                seq.cached_tokens = seq.table.num_tokens
            seq.status = SeqStatus.RUNNING
            self._order += 1
            seq.order = self._order
            self.running.append(seq)
            return seq
        return None

    # ---- decode -----------------------------------------------------------------------------------
    def _plan_decode(self) -> StepPlan | None:
        batch: list[Sequence] = []
        for seq in sorted((s for s in self.running if s.remaining == 1), key=lambda s: s.order):
            if seq.status is not SeqStatus.RUNNING:  # preempted to make room for an older one
                continue
            if self._make_room(seq, seq.table.num_tokens + 1):
                self.allocator.reserve(seq.table, seq.table.num_tokens + 1)
                batch.append(seq)
        batch = [s for s in batch if s.status is SeqStatus.RUNNING]
        if not batch:
            return None
        drafts = self._propose(batch)
        return StepPlan("decode", batch, [1 + len(d) for d in drafts], drafts)

    def _propose(self, batch: list[Sequence]) -> list[list[int]]:
        """Proposed tokens per sequence of a decode batch whose own next positions are reserved: within the
        step's row budget, the sequence's token budget (the tokens a round emits never pass max_new), and
        the free blocks (reserved here)."""
        a = self.allocator
        rows = self.max_rows - len(batch)
        out: list[list[int]] = []
        batched: list[tuple[int, Sequence, int]] = []  # the draft model's, proposed together below
        for seq in batch:
            if seq.proposer is None:
                out.append([])
                continue
            seq.draft_q = None  # the draft model's distributions belong to its own proposals only
            if seq.alternatives is not None:
                engine_spec.choose(seq)
            want = seq.controller.next_k() if seq.controller is not None else seq.spec_k
            k = min(want, rows, seq.max_new - seq.generated - 1)
            base = seq.table.num_tokens + 1
            if k > 0 and getattr(seq.proposer, "batched", False):
                while k and a.blocks_needed(seq.table, base + k) > a.num_free:
                    k -= 1
                if k and self.drafter is not None:
                    a.reserve(seq.table, base + k)  # unused positions are truncated away after verifying
                    rows -= k
                    batched.append((len(out), seq, k))
                k = 0
            if k <= 0:
                out.append([])
                continue
            draft = engine_spec.grammar_prefix(seq, seq.proposer.propose(seq.tokens, k))
            while draft and a.blocks_needed(seq.table, base + len(draft)) > a.num_free:
                draft.pop()
            if draft:
                a.reserve(seq.table, base + len(draft))
            rows -= len(draft)
            out.append(draft)
        if batched:
            got = self.drafter.propose([(seq, k) for _, seq, k in batched])
            for i, seq, _ in batched:
                out[i] = engine_spec.grammar_prefix(seq, got[seq.id])  # drawn under the mask: all of it
        return out

    # ---- memory -----------------------------------------------------------------------------------
    def _make_room(self, seq: Sequence, new_len: int) -> bool:
        """Free blocks for `seq` to reach new_len by preempting newer sequences; False if seq had to go."""
        a = self.allocator
        while a.blocks_needed(seq.table, new_len) > a.num_free:
            victim = max(self.running, key=lambda s: s.order)
            if victim is seq and len(self.running) == 1:
                self.running.remove(seq)
                a.free(seq.table)
                self._release_draft(seq)
                self.failed.append((seq, self._too_small(seq)))
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.table)
        self._release_draft(seq)
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _too_small(self, seq: Sequence) -> KVPoolError:
        """A single sequence needs more KV blocks than the whole pool has."""
        a = self.allocator
        return KVPoolError.for_tokens(len(seq.tokens), a.num_blocks * a.block_size)
