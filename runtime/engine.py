"""The engine: one thread runs continuous batching over every live sequence of one model.

Requests are submitted from any thread (`submit`) and stream token ids back through their
`SequenceStream`s; `Request.cancel()` frees a request's blocks at the next step boundary (a prefill
chunk of the cancelled request stops between layers) and sets an event when done. The engine owns
the paged KV cache and the scheduler; each step it asks the scheduler for a plan, runs one forward
over the planned tokens, samples, and emits events.

How a plan's forward runs is `runtime.step_forward`; speculation as a decode step is `runtime.engine_spec`.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback

import psutil
import torch

from ripelm.runtime import engine_spec
from ripelm.runtime.block_allocator import chain_hash
from ripelm.runtime.cuda_step import graphs_enabled, static_decode_or_none
from ripelm.runtime.draft_runner import DraftRunner
from ripelm.runtime.engine_counters import EngineCounters
from ripelm.runtime.engine_spec import DEFAULT_SPEC_K, SPEC_MAX_ROWS, SPECULATE_MODES
from ripelm.runtime.errors import BackendError, KVPoolError, check_context
from ripelm.runtime.grammar import Constraint
from ripelm.runtime.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    PagedKVCache,
    kv_dtype_for,
    kv_pool_blocks,
    paged_cache_for,
    window_pool_blocks,
)
from ripelm.runtime.model import ForwardInterrupted, Transformer
from ripelm.runtime.sampling import Sampler, SamplingParams
from ripelm.runtime.scheduler import Scheduler, StepPlan
from ripelm.runtime.sequence import Finish, Request, SeqStatus, Sequence, SpecToken
from ripelm.runtime.spec_control import MAX_K
from ripelm.runtime.step_forward import StepForward
from ripelm.runtime.token_logprobs import token_logprobs

DEFAULT_MAX_SEQS = 64
DEFAULT_PREFILL_CHUNK = 512
__all__ = ["DEFAULT_SPEC_K", "SPECULATE_MODES", "SPEC_MAX_ROWS", "Engine", "EngineCounters", "KVPoolError"]


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
        draft_model: Transformer | None = None,
    ):
        """`draft_model`: a smaller model of the same vocabulary that requests submitted with
        `speculate="draft"` draft with, on its own paged pool of the same number of tokens."""
        cfg = model.cfg
        self.model = model
        self.context_length = context_length
        self.eog_ids = frozenset(eog_ids)
        per_block = PagedKVCache.bytes_per_block(
            cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, kv_dtype_for(model)
        )
        blocks = kv_pool_blocks(
            per_block, context_length, block_size, kv_memory, psutil.virtual_memory().available
        )
        window_blocks = window_pool_blocks(cfg.sliding_window, block_size, max_seqs, prefill_chunk)
        self.cache = paged_cache_for(
            model, blocks, block_size, hash_fn, windowed=True, window_blocks=window_blocks
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
        self.forward = StepForward(model, self.cache, self.native, self.static)
        self.drafter = None
        if draft_model is not None:
            self.drafter = DraftRunner(
                draft_model, num_blocks=blocks, block_size=block_size, hash_fn=hash_fn, vocab=cfg.vocab_size
            )
        self.scheduler = Scheduler(
            self.allocator,
            max_seqs=max_seqs,
            prefill_chunk=prefill_chunk,
            max_rows=SPEC_MAX_ROWS,
            drafter=self.drafter,
        )
        self.counters = EngineCounters(
            total_blocks=blocks, block_size=block_size, draft_total_blocks=blocks if self.drafter else 0
        )
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
        constraint: Constraint | None = None,
    ) -> Request:
        """Queue a generation. `speculate="ngram"`: decode steps verify up to `spec_k` tokens proposed by
        prompt lookup (same output, fewer steps when the text repeats its context); "draft": proposed by the
        engine's draft model, batched across sequences; "off": plain decoding.
        `spec_adaptive`: the number proposed follows the measured step costs and acceptance, down to none
        while proposals do not pay (`SpecController`); else always `spec_k` when there is a match."""
        params.validate()
        if not prompt:
            raise ValueError("empty prompt")
        if n < 1:
            raise ValueError("n must be >= 1")
        if speculate not in SPECULATE_MODES:
            raise ValueError(f"unknown speculation '{speculate}' (choose from {', '.join(SPECULATE_MODES)})")
        if speculate == "auto" and self.drafter is None:
            speculate = "ngram"  # no draft model: prompt lookup alone
        if speculate == "draft" and self.drafter is None:
            raise ValueError("speculate='draft' needs an engine made with a draft model")
        if not 0 <= spec_k <= MAX_K:
            raise ValueError(f"the number of proposed tokens must be in 0..{MAX_K}, got {spec_k}")
        check_context(len(prompt), self.context_length)
        pool_tokens = self.allocator.num_blocks * self.allocator.block_size
        if len(prompt) >= pool_tokens:
            raise KVPoolError.for_tokens(len(prompt), pool_tokens)
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
        seq.constraint = constraint
        if speculate != "off" and spec_k > 0:  # under a grammar too: see engine_spec.grammar_prefix
            engine_spec.start(seq, spec_k, spec_adaptive, speculate)
        req.sequences.append(seq)
        with self._cond:
            if self._closing:
                raise BackendError("the engine is closed")
            self._inbox.append(seq)
            self._cond.notify()
        return req

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
            self._finish(seq, "error", err)
        self.scheduler.failed.clear()
        if plan is not None:
            try:
                t = time.perf_counter()
                self._run(plan)
                if plan.kind == "decode":
                    engine_spec.record_costs(plan, time.perf_counter() - t)
            except ForwardInterrupted:  # its one sequence was cancelled mid-prefill: nothing was committed
                self._take_cancels()
            except Exception as e:  # a bug, not user input: end the step's sequences, keep serving others
                traceback.print_exc()
                for seq in plan.seqs:
                    if seq.status is not SeqStatus.FINISHED:
                        self._finish(seq, "error", BackendError(f"generation failed: {e}"))
        self._update_counters()
        return plan is not None

    def _take_cancels(self) -> None:
        with self._cond:
            cancels, self._cancels = self._cancels, []
        for req in cancels:
            whole = req.cancel_requested.is_set()  # else some samples only (`Request.cancel(index)`)
            for seq in req.sequences:
                mine = whole or req.queues.index(seq.out) in req.dropped
                if seq.status is not SeqStatus.FINISHED and mine:
                    self._finish(seq, "cancelled")
            if whole:
                req.cancelled.set()

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step on the caller's thread until no work is left (for an engine made with threaded=False)."""
        for _ in range(max_steps):
            if not self.step() and not self._inbox and not self._cancels:
                return
        raise RuntimeError("engine did not go idle")

    def _run(self, plan: StepPlan) -> None:
        starts = [s.table.num_tokens for s in plan.seqs]
        if plan.kind == "decode":  # each sequence's last token, then the tokens proposed after it
            new = [s.tokens[p : p + 1] + d for s, p, d in zip(plan.seqs, starts, plan.drafts, strict=True)]
        else:
            new = [s.tokens[p : p + c] for s, p, c in zip(plan.seqs, starts, plan.counts, strict=True)]
        self.cache.apply_copies()
        ready, logits = self.forward.run(plan, starts, new)
        self._commit(plan, new, ready, logits)

    def _commit(self, plan: StepPlan, new: list[list[int]], ready: list[int], logits: torch.Tensor) -> None:
        """Record the step's K/V and emit tokens. A prefill's logits are one row per ready sequence; a
        decode step's are every row of every sequence (1 + its proposed tokens), in order."""
        drafts = plan.drafts or [[] for _ in plan.seqs]
        for seq, chunk, draft in zip(plan.seqs, new, drafts, strict=True):
            seq.computed_tokens += len(chunk)
            if not draft:  # with proposals, only the accepted rows are committed (`engine_spec.accept`)
                self.allocator.commit(seq.table, chunk)
        if plan.kind == "prefill":
            self.counters.prefill_tokens += plan.counts[0]
            for j, i in enumerate(ready):
                seq = plan.seqs[i]
                row = logits[j]
                if self.drafter is not None and seq.spec is not None and "draft" in seq.spec.proposer:
                    self.drafter.prefill(seq)  # the draft's prompt K/V now, as part of the prefill
                if seq.forks:
                    self._fork(seq, row)
                self._sample(seq, row)
            return
        first = 0
        for seq, draft in zip(plan.seqs, plan.drafts, strict=True):
            rows = logits[first : first + 1 + len(draft)]
            first += 1 + len(draft)
            before = len(seq.tokens)
            if draft:  # accept a prefix by the exact rules, roll the cache back past it, emit
                self._emit(seq, engine_spec.accept(self.allocator, self.counters, seq, draft, rows), rows)
            else:
                self._sample(seq, rows[0])
            self.counters.decode_tokens += len(seq.tokens) - before

    def _fork(self, parent: Sequence, logits: torch.Tensor) -> None:
        """Parallel samples: children share the parent's blocks (copy-on-write) and its prompt logits."""
        req = parent.request
        for i in range(1, parent.forks + 1):
            if i in req.dropped:  # its reader left before it was forked
                req.queues[i].put(Finish(reason="cancelled"))
                continue
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
                constraint=parent.constraint.copy() if parent.constraint is not None else None,
            )
            if parent.proposer is not None:
                adaptive = parent.controller is None or parent.controller.policy.fixed_k is None
                mode = "auto" if parent.alternatives is not None else parent.proposer.name
                engine_spec.start(child, parent.spec_k, adaptive, mode)
            req.sequences.append(child)
            self.scheduler.running.append(child)
            self._sample(child, logits)
        parent.forks = 0

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        if seq.generated == 0 and seq.preemptions == 0:
            seq.out.put(("cached", seq.cached_tokens))
        c = seq.constraint  # structured output: sampled among the tokens the grammar allows
        tok = seq.sampler(logits, seq.tokens) if c is None else c.sample(seq.sampler, logits, seq.tokens)
        self._emit(seq, [tok], logits.unsqueeze(0))

    def _emit(self, seq: Sequence, tokens: list[int], rows: torch.Tensor) -> None:
        """Stream the tokens one target forward produced for `seq` (rows[i]: the logits token i was chosen
        from), ending it at the first stop token or at its budget (later tokens of the same forward are
        dropped). With `logprobs` asked for, each token's `TokenLogprob` goes just before it."""
        spec = None
        if seq.spec is not None:  # the figures travel with the step's first token: a reader stopping at
            seq.spec.forwards += 1  # a token has them
            spec = seq.spec.copy()
        top = seq.params.logprobs
        lps = token_logprobs(rows, tokens, top) if top is not None else None
        for i, tok in enumerate(tokens):
            if lps is not None:
                seq.out.put(lps[i])
            seq.tokens.append(tok)
            seq.out.put(SpecToken(tok, spec) if spec is not None and i == 0 else tok)
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
            c.used_blocks = self.cache.used_blocks  # both layer groups' blocks with window layers
            c.running = len(s.running)
            c.waiting = len(s.waiting) + len(self._inbox)
            if self.drafter is not None:
                c.draft_free_blocks = self.drafter.allocator.num_free
                c.draft_used_blocks = self.drafter.allocator.num_used
