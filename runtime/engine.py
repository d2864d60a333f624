"""The engine: one thread runs continuous batching over every live sequence of one model.

Requests are submitted from any thread (`submit`) and stream token ids back through their
`SequenceStream`s; `Request.cancel()` frees a request's blocks at the next step boundary (a prefill
chunk of the cancelled request stops between layers) and sets an event when done. The engine owns
the paged KV cache and the scheduler; each step it asks the scheduler for a plan, runs one forward
over the planned tokens, samples, and emits events.

Speculation is a kind of decode step, not a second engine. A request submitted with `speculate="ngram"`
gets a proposer (prompt lookup, `runtime.proposer`); at each decode step the scheduler asks it for up to
`spec_k` tokens and reserves their positions. The step then runs ONE target forward over every row: the
last token of each plain sequence, and for a speculating sequence its last token followed by its proposed
tokens, each row at its own position with the sequence's block table (the native step takes several rows
of one sequence; on torch each row is a one-query entry of the `PagedBatch`, so it is computed exactly as a
plain decode row is). All rows write their K/V into the paged pool. Per speculating sequence the exact rules
of `spec_verify` accept a prefix of the proposal (greedy: while it is the target's argmax; sampling: the
proposal is a point-mass draft, so x is accepted with probability p(x) and a rejection is followed by a
draw from p with x removed and renormalized: the emitted token follows p), the allocator truncates the
rejected positions away, and the accepted tokens plus the target's next token are emitted one by one
through the same path as a sampled token, so an end-of-generation token or the token budget ends the
sequence exactly where plain decoding would. Greedy output is therefore token for token the output without
speculation, and sampled output has the same distribution. Stop strings are cut by the reader, as always.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from dataclasses import dataclass

import psutil
import torch

from ripelm.kernels.paged_attention import PagedBatch
from ripelm.runtime.block_allocator import chain_hash
from ripelm.runtime.cuda_step import graphs_enabled, static_decode_or_none
from ripelm.runtime.errors import BackendError, ContextOverflowError
from ripelm.runtime.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache, kv_pool_blocks
from ripelm.runtime.model import ForwardInterrupted, Transformer
from ripelm.runtime.native_decode import NATIVE_KV_DTYPE
from ripelm.runtime.proposer import NgramProposer, Proposer
from ripelm.runtime.sampling import Sampler, SamplingParams, filtered_probs, penalized_logits
from ripelm.runtime.scheduler import Scheduler, StepPlan
from ripelm.runtime.sequence import Finish, Request, SeqStatus, Sequence, SpecTally
from ripelm.runtime.spec_control import MAX_K, DraftPolicy, SpecController
from ripelm.runtime.spec_verify import verify_greedy, verify_sampled

DEFAULT_MAX_SEQS = 64
DEFAULT_PREFILL_CHUNK = 512
SPECULATE_MODES = ("off", "ngram")
DEFAULT_SPEC_K = 8  # most tokens proposed per decode step of a speculating sequence (the controller picks)
SPEC_MAX_ROWS = 16  # rows of a decode step that verifies proposals (the native step's batch)


class KVPoolError(ContextOverflowError):
    """A sequence cannot fit the KV pool even on its own."""


@dataclass
class EngineCounters:
    steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (cache hits excluded)
    decode_tokens: int = 0  # tokens emitted by decode steps (accepted proposals included)
    preemptions: int = 0
    evictions: int = 0
    free_blocks: int = 0
    used_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 0
    running: int = 0
    waiting: int = 0
    spec_rounds: int = 0  # (sequence, decode step) pairs that verified at least one proposed token
    spec_proposed: int = 0  # proposed tokens verified
    spec_accepted: int = 0  # ... and accepted


class Engine:
    def __init__(
        self,
        model: Transformer,
        *,
        context_length: int,
        eog_ids: frozenset[int] | set[int] = frozenset(),
        kv_memory: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_seqs: int = DEFAULT_MAX_SEQS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        hash_fn=chain_hash,
        threaded: bool = True,
    ):
        cfg = model.cfg
        self.model = model
        self.context_length = context_length
        self.eog_ids = frozenset(eog_ids)
        # The native step keeps K/V in float16, as llama.cpp does (bfloat16 keys cost it agreement).
        kv_dtype = NATIVE_KV_DTYPE if getattr(model, "native", None) is not None else model.dtype
        per_block = PagedKVCache.bytes_per_block(
            cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, kv_dtype
        )
        blocks = kv_pool_blocks(
            per_block, context_length, block_size, kv_memory, psutil.virtual_memory().available
        )
        self.cache = PagedKVCache(
            cfg.n_layers,
            blocks,
            cfg.n_kv_heads,
            cfg.head_dim,
            block_size=block_size,
            dtype=kv_dtype,
            device=model.device,
            hash_fn=hash_fn,
        )
        self.allocator = self.cache.allocator
        # The native CPU step runs decode steps and short prefill chunks when the model has it.
        self.native = model.native.runner(self.cache) if getattr(model, "native", None) is not None else None
        # On CUDA, decode steps replay CUDA graphs of a static-shaped forward (captured here, at load).
        self.static = (
            static_decode_or_none(model, self.cache, context_length)
            if self.cache.device.type == "cuda" and graphs_enabled()
            else None
        )
        self.scheduler = Scheduler(
            self.allocator, max_seqs=max_seqs, prefill_chunk=prefill_chunk, max_rows=SPEC_MAX_ROWS
        )
        self.counters = EngineCounters(total_blocks=blocks, block_size=block_size)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._cancels: list[Request] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._loop, name="ripelm-engine", daemon=True)
            self._thread.start()

    # ---- API (any thread) -----------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        n: int = 1,
        ignore_eos: bool = False,
        speculate: str = "off",
        spec_k: int = DEFAULT_SPEC_K,
        spec_adaptive: bool = True,
    ) -> Request:
        """Queue a generation. `speculate="ngram"`: decode steps verify up to `spec_k` tokens proposed by
        prompt lookup (same output, fewer steps when the text repeats its context); "off": plain decoding.
        `spec_adaptive`: the number proposed follows the measured step costs and acceptance, down to none
        while proposals do not pay (`SpecController`); else always `spec_k` when there is a match."""
        params.validate()
        if not prompt:
            raise ValueError("empty prompt")
        if n < 1:
            raise ValueError("n must be >= 1")
        if speculate not in SPECULATE_MODES:
            raise ValueError(f"unknown speculation '{speculate}' (choose from {', '.join(SPECULATE_MODES)})")
        if not 0 <= spec_k <= MAX_K:
            raise ValueError(f"the number of proposed tokens must be in 0..{MAX_K}, got {spec_k}")
        if len(prompt) >= self.context_length:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context window is {self.context_length}"
            )
        pool_tokens = self.allocator.num_blocks * self.allocator.block_size
        if len(prompt) >= pool_tokens:
            raise KVPoolError(
                f"the prompt is {len(prompt)} tokens but the KV pool holds {pool_tokens}; raise --kv-memory"
            )
        req = Request(next(self._ids), n)
        req._cancel_fn = self._request_cancel
        seq = Sequence(
            id=next(self._ids),
            tokens=list(prompt),
            prompt_len=len(prompt),
            params=params,
            sampler=Sampler(params),
            max_new=min(params.max_tokens, self.context_length - len(prompt)),
            stop_ids=frozenset() if ignore_eos else self.eog_ids,
            out=req.queues[0],
            request=req,
            forks=n - 1,
        )
        if speculate != "off" and spec_k > 0:
            self._speculate(seq, spec_k, spec_adaptive)
        req.sequences.append(seq)
        with self._cond:
            if self._closing:
                raise BackendError("the engine is closed")
            self._inbox.append(seq)
            self._cond.notify()
        return req

    @staticmethod
    def _speculate(seq: Sequence, k: int, adaptive: bool) -> None:
        """Give `seq` a prompt-lookup proposer of its own (its index covers this sequence's tokens only) and
        a controller: prompt lookup costs nothing to draft, so a proposal pays when the expected accepted
        tokens outweigh what its extra rows add to the step (`spec_control`; the step costs it learns are
        those of the steps this sequence takes part in)."""
        # single-token matches were accepted too rarely to pay (ripe ask over the seeds: median 1.31x with
        # them, 1.51x without, at k <= 4)
        proposer: Proposer = NgramProposer(min_n=2)
        # Cautious until measured: a first proposal of 2 at a prior acceptance of one half (open-ended chat
        # rejects most lookups; a long all-rejected step there costs more than it risks).
        policy = DraftPolicy(
            k_max=k,
            k_init=min(k, 2),
            min_confidence=0.0,
            prior_acceptance=0.5,
            fixed_k=None if adaptive else k,
        )
        ctl = SpecController(policy)
        ctl.record_draft(0.0)
        seq.proposer, seq.spec_k, seq.controller = proposer, k, ctl
        seq.spec = SpecTally(proposer=proposer.name)

    def _request_cancel(self, req: Request) -> None:
        with self._cond:
            self._cancels.append(req)
            self._cond.notify()

    def snapshot(self) -> EngineCounters:
        """Counters as of the last step boundary (safe to read from any thread)."""
        with self._cond:
            return EngineCounters(**vars(self.counters))

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting) + self._inbox:
            self._finish(seq, "error", BackendError("the engine was closed"))

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._inbox or self._cancels or self.scheduler.has_work()):
                    self._cond.wait()
                if self._closing:
                    return
            self.step()

    def step(self) -> bool:
        """Take in new requests and cancellations, then run one forward; False if there was nothing to run."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for seq in inbox:
            if seq.request.cancel_requested.is_set():
                self._finish(seq, "cancelled")
            else:
                self.scheduler.add(seq)
        self._take_cancels()
        plan = self.scheduler.schedule()
        for seq, err in self.scheduler.failed:
            self._finish(seq, "error", KVPoolError(str(err)))
        self.scheduler.failed.clear()
        if plan is not None:
            try:
                t = time.perf_counter()
                self._run(plan)
                if plan.kind == "decode":
                    self._record_costs(plan, time.perf_counter() - t)
            except ForwardInterrupted:  # its one sequence was cancelled mid-prefill: nothing was committed
                self._take_cancels()
            except Exception as e:  # a bug, not user input: end the step's sequences, keep serving others
                traceback.print_exc()
                for seq in plan.seqs:
                    if seq.status is not SeqStatus.FINISHED:
                        self._finish(seq, "error", BackendError(f"generation failed: {e}"))
        self._update_counters()
        return plan is not None

    @staticmethod
    def _record_costs(plan: StepPlan, seconds: float) -> None:
        """Each speculating sequence's controller learns what a step with its rows cost (forward, sampling
        and verification: all that its proposals add) and what its state now is."""
        for seq, draft in zip(plan.seqs, plan.drafts, strict=True):
            ctl = seq.controller
            if ctl is None:
                continue
            ctl.record_verify(1 + len(draft), seconds)
            if not draft:
                ctl.record_round(0, 0, 1)
            elif seq.spec is not None:  # the state as of the last round that proposed
                seq.spec.state = ctl.summary()

    def _take_cancels(self) -> None:
        with self._cond:
            cancels, self._cancels = self._cancels, []
        for req in cancels:
            for seq in req.sequences:
                if seq.status is not SeqStatus.FINISHED:
                    self._finish(seq, "cancelled")
            req.cancelled.set()

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step on the caller's thread until no work is left (for an engine made with threaded=False)."""
        for _ in range(max_steps):
            if not self.step() and not self._inbox and not self._cancels:
                return
        raise RuntimeError("engine did not go idle")

    def _run(self, plan: StepPlan) -> None:
        dev = self.model.device
        starts = [s.table.num_tokens for s in plan.seqs]
        if plan.kind == "decode":  # each sequence's last token, then the tokens proposed after it
            new = [s.tokens[p : p + 1] + d for s, p, d in zip(plan.seqs, starts, plan.drafts, strict=True)]
        else:
            new = [s.tokens[p : p + c] for s, p, c in zip(plan.seqs, starts, plan.counts, strict=True)]
        self.cache.apply_copies()
        # Recomputing a preempted sequence goes through the native step too, so its history gets the same
        # K/V as when it was first decoded (and its greedy continuation the same tokens).
        if self.native is not None and (self.native.takes(sum(plan.counts)) or plan.seqs[0].preemptions > 0):
            self._run_native(plan, starts, new)
            return
        if plan.kind == "decode":
            if self.static is not None and self.static.takes(sum(plan.counts)):
                logits = self._decode_static(plan, starts, new)
            else:
                logits = self._decode_torch(plan, starts, new)
            self._commit(plan, new, list(range(len(plan.seqs))), logits)
            return
        batch = PagedBatch(
            self.allocator.block_size,
            [s.table.blocks for s in plan.seqs],
            plan.counts,
            [p + c for p, c in zip(starts, plan.counts, strict=True)],
            device=dev,
            num_blocks=self.allocator.num_blocks,
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
        self._commit(plan, new, ready, logits)

    def _decode_torch(self, plan: StepPlan, starts: list[int], new: list[list[int]]) -> torch.Tensor:
        """A decode step on torch: every row (a sequence's last token, or one of its proposed tokens) is a
        one-query entry of the batch at its own position, so it is computed as a plain decode row is; the
        rows of one sequence see each other's K/V, which each layer writes before it attends. Logits of all
        rows, in order."""
        dev = self.model.device
        tables, ctx, positions = [], [], []
        for seq, p, chunk in zip(plan.seqs, starts, new, strict=True):
            for j in range(len(chunk)):
                tables.append(seq.table.blocks)
                positions.append(p + j)
                ctx.append(p + j + 1)
        batch = PagedBatch(
            self.allocator.block_size,
            tables,
            [1] * len(tables),
            ctx,
            device=dev,
            num_blocks=self.allocator.num_blocks,
        )
        tokens = torch.tensor([t for chunk in new for t in chunk], dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        rows = torch.arange(len(tables), dtype=torch.long, device=dev)
        return self.model(tokens, pos, self.cache.step(batch), logits_rows=rows)

    def _decode_static(self, plan: StepPlan, starts: list[int], new: list[list[int]]) -> torch.Tensor:
        """A decode step through the CUDA graphs: the same rows as `_decode_torch` (one query each, at its
        own position, with its sequence's block table). Logits of all rows, in order."""
        tokens, positions, tables = [], [], []
        for seq, p, chunk in zip(plan.seqs, starts, new, strict=True):
            for j, tok in enumerate(chunk):
                tokens.append(tok)
                positions.append(p + j)
                tables.append(seq.table.blocks)
        x = self.model.embed(torch.tensor(tokens, dtype=torch.long)).float()
        return self.static.forward(x, positions, tables)  # type: ignore[union-attr]

    def _run_native(self, plan: StepPlan, starts: list[int], new: list[list[int]]) -> None:
        """The step on the native library: one call for all layers of all rows, the GIL released."""
        tokens, positions, tables, logit_rows, ready = [], [], [], [], []
        for i, (seq, p, chunk) in enumerate(zip(plan.seqs, starts, new, strict=True)):
            blocks = seq.table.blocks
            for j, tok in enumerate(chunk):
                tokens.append(tok)
                positions.append(p + j)
                tables.append(blocks)
            if plan.kind == "decode":  # all rows: the proposed tokens are checked against them
                ready.append(i)
                logit_rows.extend(range(len(tokens) - len(chunk), len(tokens)))
            elif p + len(chunk) == len(seq.tokens):
                ready.append(i)
                logit_rows.append(len(tokens) - 1)
        if not logit_rows:
            logit_rows = [len(tokens) - 1]
        # A long prefill chunk runs as several native steps; a cancel is acknowledged between them.
        interrupt = plan.seqs[0].request.cancel_requested.is_set if plan.kind == "prefill" else None
        x = self.model.embed(torch.tensor(tokens, dtype=torch.long))
        logits, _ = self.native.forward(x, positions, tables, logit_rows, interrupt=interrupt)
        self._commit(plan, new, ready, logits)

    def _commit(self, plan: StepPlan, new: list[list[int]], ready: list[int], logits: torch.Tensor) -> None:
        """Record the step's K/V and emit tokens. A prefill's logits are one row per ready sequence; a
        decode step's are every row of every sequence (1 + its proposed tokens), in order."""
        drafts = plan.drafts or [[] for _ in plan.seqs]
        for seq, chunk, draft in zip(plan.seqs, new, drafts, strict=True):
            seq.computed_tokens += len(chunk)
            if not draft:  # with proposals, only the accepted rows are committed (`_verify`)
                self.allocator.commit(seq.table, chunk)
        if plan.kind == "prefill":
            self.counters.prefill_tokens += plan.counts[0]
            for j, i in enumerate(ready):
                seq = plan.seqs[i]
                row = logits[j]
                if seq.forks:
                    self._fork(seq, row)
                self._sample(seq, row)
            return
        first = 0
        for seq, draft in zip(plan.seqs, plan.drafts, strict=True):
            rows = logits[first : first + 1 + len(draft)]
            first += 1 + len(draft)
            before = len(seq.tokens)
            if draft:
                self._verify(seq, draft, rows)
            else:
                self._sample(seq, rows[0])
            self.counters.decode_tokens += len(seq.tokens) - before

    def _verify(self, seq: Sequence, draft: list[int], logits: torch.Tensor) -> None:
        """Accept a prefix of the proposed tokens by the exact rules, roll the cache back past it, and emit
        it with the target's token that follows.

        logits: [1 + k, V], row i scored after seq.tokens + draft[:i]. The target's token at each row is
        chosen as `Sampler` chooses (same repetition penalty history, same filtering, first maximum when
        greedy); the proposal is a point-mass draft, so `verify_sampled` accepts x with probability p(x)
        and on rejection draws from p with x removed: each emitted token follows p exactly.
        """
        params = seq.params
        k = len(draft)
        start = len(seq.tokens) - 1  # position of the first row
        hists = None
        if params.repetition_penalty != 1.0:
            tail = seq.tokens[-params.repeat_last_n :]
            hists = [tail + draft[:i] for i in range(k + 1)]
        z = penalized_logits(logits.cpu(), params, hists)
        x = torch.tensor([draft], dtype=torch.long)
        if params.greedy:
            choice = torch.from_numpy(z.numpy().argmax(-1)).long()  # numpy's argmax, as the Sampler's
            verdict = verify_greedy(x, choice.unsqueeze(0))
        else:
            p = filtered_probs(z, params)
            q = torch.zeros(k, p.shape[-1])
            q[torch.arange(k), x[0]] = 1.0
            verdict = verify_sampled(x, q.unsqueeze(0), p.unsqueeze(0), seq.sampler.generator)
        n = int(verdict.n_accepted[0])
        # The rejected rows' K/V stay in the pool past the table's end, never read (attention stops at the
        # sequence's length) and overwritten by its next step; their blocks never enter the prefix cache.
        self.allocator.commit(seq.table, [seq.tokens[start]] + draft[:n])
        self.allocator.truncate(seq.table, start + 1 + n)
        if seq.controller is not None:
            seq.controller.record_round(k, n, n + 1)
        spec = seq.spec
        if spec is not None:
            spec.rounds += 1
            spec.proposed += k
            spec.accepted += n
        self.counters.spec_rounds += 1
        self.counters.spec_proposed += k
        self.counters.spec_accepted += n
        self._emit(seq, draft[:n] + [int(verdict.next_token[0])])

    def _fork(self, parent: Sequence, logits: torch.Tensor) -> None:
        """Parallel samples: children share the parent's blocks (copy-on-write) and its prompt logits."""
        req = parent.request
        for i in range(1, parent.forks + 1):
            params = parent.params
            if params.seed is not None:
                params = SamplingParams(**{**vars(params), "seed": params.seed + i})
            child = Sequence(
                id=next(self._ids),
                tokens=list(parent.tokens),
                prompt_len=parent.prompt_len,
                params=params,
                sampler=Sampler(params),
                max_new=parent.max_new,
                stop_ids=parent.stop_ids,
                out=req.queues[i],
                request=req,
                table=self.allocator.fork(parent.table),
                status=SeqStatus.RUNNING,
                order=parent.order,
                cached_tokens=parent.cached_tokens,
            )
            if parent.proposer is not None:
                adaptive = parent.controller is None or parent.controller.policy.fixed_k is None
                self._speculate(child, parent.spec_k, adaptive)
            req.sequences.append(child)
            self.scheduler.running.append(child)
            self._sample(child, logits)
        parent.forks = 0

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        if seq.generated == 0 and seq.preemptions == 0:
            seq.out.put(("cached", seq.cached_tokens))
        self._emit(seq, [seq.sampler(logits, seq.tokens)])

    def _emit(self, seq: Sequence, tokens: list[int]) -> None:
        """Stream the tokens one target forward produced for `seq`, ending it at the first stop token or at
        its budget (later tokens of the same forward are dropped)."""
        if seq.spec is not None:
            seq.spec.forwards += 1
            seq.out.put(seq.spec.copy())  # the figures first, so a reader that stops at a token has them
        for tok in tokens:
            seq.tokens.append(tok)
            seq.out.put(tok)
            if tok in seq.stop_ids:
                self._finish(seq, "stop")
                return
            if seq.generated >= seq.max_new or len(seq.tokens) >= self.context_length:
                self._finish(seq, "length")
                return

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        self.scheduler.remove(seq)
        fin = Finish(
            reason=reason,
            cached_tokens=max(0, seq.cached_tokens),
            computed_tokens=seq.computed_tokens,
            preemptions=seq.preemptions,
            error=error,
            spec=seq.spec.copy() if seq.spec is not None else None,
        )
        seq.out.put(fin)
        # Samples not forked yet (the prompt never finished) end the same way.
        for q in seq.request.queues[1 : 1 + seq.forks]:
            q.put(fin)
        seq.forks = 0

    def _update_counters(self) -> None:
        a, s = self.allocator, self.scheduler
        with self._cond:
            c = self.counters
            c.steps += 1
            c.preemptions = s.preemptions
            c.evictions = a.evictions
            c.free_blocks = a.num_free
            c.used_blocks = a.num_used
            c.running = len(s.running)
            c.waiting = len(s.waiting) + len(self._inbox)
