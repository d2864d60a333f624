"""The native runtime served through the batched engine, behind the `Backend` protocol.

Every generation (a chat turn, a regenerate, `ripe run`) becomes a request to one shared `Engine`, so
they share the paged KV cache: a chat turn that extends the previous one finds its prefix cached, and
concurrent callers are batched. `speculate="ngram"` makes every request speculate with prompt lookup inside
the engine (`Engine.submit`), `speculate="draft"` with the draft model opened beside the target (`draft_path`,
same vocabulary; it runs in the engine on its own paged pool); the figures land in the generation's stats
(drafted = proposed tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from ripelm.models.gguf_file import GGUFFile
from ripelm.runtime.backend import Capabilities, GenerationStats
from ripelm.runtime.engine import DEFAULT_MAX_SEQS, DEFAULT_SPEC_K, SPECULATE_MODES, Engine
from ripelm.runtime.grammar import Constraint
from ripelm.runtime.native import load_native
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.sequence import Request, SpecTally
from ripelm.runtime.tokenizer import Tokenizer


class EngineBackend:
    name = "native"
    caps = Capabilities(batched=True, cancel=True, kv_stats=True, samples=True, logprobs=True)

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | None = None,
        n_ctx: int | None = None,
        kv_memory: int | None = None,
        max_seqs: int = DEFAULT_MAX_SEQS,
        tokenizer: Tokenizer | None = None,
        gguf: GGUFFile | None = None,
        speculate: str = "off",
        spec_k: int = DEFAULT_SPEC_K,
        spec_adaptive: bool = True,
        draft_path: str | Path | None = None,
        draft_gguf: GGUFFile | None = None,
    ):
        if speculate not in SPECULATE_MODES:
            raise ValueError(f"unknown speculation '{speculate}' (choose from {', '.join(SPECULATE_MODES)})")
        self.speculate, self.spec_k, self.spec_adaptive = speculate, spec_k, spec_adaptive
        load_native(
            self, model_path, device=device, n_ctx=n_ctx, tokenizer=tokenizer, reference=False, gguf=gguf
        )
        self.draft = None
        if draft_path is not None:
            # the draft shares the target's tokenizer (checked by the caller) and context window
            self.draft = SimpleNamespace()
            load_native(
                self.draft,
                draft_path,
                device=device,
                n_ctx=self.context_length,
                tokenizer=self.tokenizer,
                reference=False,
                gguf=draft_gguf,
            )
            self.name = "native+draft"
        elif speculate == "draft":
            raise ValueError("speculate='draft' needs a draft model (draft_path)")
        elif speculate == "auto":
            self.speculate = "ngram"  # no draft model: prompt lookup alone
        self.engine = Engine(
            self.model,
            context_length=self.context_length,
            eog_ids=self.tokenizer.eog_ids,
            kv_memory=kv_memory,
            max_seqs=max_seqs,
            draft_model=self.draft.model if self.draft is not None else None,
        )

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        yield from self.request_ids(self.submit(prompt, params), stats)

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1) -> Request:
        """Start a generation and return its engine `Request`, for callers that must cancel it from another
        thread: `request.cancel()` returns the event the engine sets once the request's blocks are freed.
        Read its tokens with `request_ids`. ModelFileChangedError if the model file changed since it was
        loaded (models/file_guard.py). n > 1: parallel samples of the one prompt, sharing its K/V blocks
        (read sample i with `request_ids(req, stats, i)`)."""
        self.file_guard.check()
        if self.draft is not None:
            self.draft.file_guard.check()
        constraint = Constraint(self.tokenizer, params.grammar) if params.grammar is not None else None
        return self.engine.submit(
            prompt,
            params,
            n=n,
            speculate=self.speculate,
            spec_k=self.spec_k,
            spec_adaptive=self.spec_adaptive,
            constraint=constraint,
        )

    def request_ids(self, req: Request, stats: GenerationStats, index: int = 0) -> Iterator[int]:
        """The token ids of sample `index` of a submitted request (what `generate_ids` yields); cancels it
        (that sample only, when there are more) if left early. With `logprobs` asked for, `stats.logprobs`
        holds one `TokenLogprob` per token yielded."""
        stream = req.streams[index]
        stats.logprobs = stream.logprobs
        noted = None
        try:
            for tok in stream:
                if stream.cached_tokens is not None:
                    stats.cached_tokens = stream.cached_tokens
                if stream.spec is not None:
                    if stream.spec is not noted:  # new figures come with a step's first token
                        self._note_speculation(stats, noted := stream.spec)
                    stats.emitted_tokens += 1
                yield tok
        finally:
            if stream.finish is None:
                req.cancel(index)

    def _note_speculation(self, stats: GenerationStats, spec: SpecTally) -> None:
        stats.drafted, stats.accepted, stats.target_forwards = spec.proposed, spec.accepted, spec.forwards
        how = "prompt lookup"
        if spec.proposer != "ngram":
            how = f"draft {self.draft.path.name}" + (" or prompt lookup" if spec.proposer != "draft" else "")
        stats.speculation = f"{how}, up to {self.spec_k} tokens per step" + (
            f" ({spec.state})" if spec.state else ""
        )

    @property
    def kv_bytes(self) -> int:
        """The K/V pools' reserved size (the target's and the draft's): what a memory budget must count
        besides the weights, although pages are touched only as sequences use them."""
        caches = [self.engine.cache] + ([self.engine.drafter.cache] if self.engine.drafter else [])
        return sum(c.k.nbytes + c.v.nbytes for c in caches)

    def kv_blocks(self) -> tuple[int, int]:
        """(used, total) KV blocks as of the last step: the target's pool and the draft's."""
        c = self.engine.snapshot()
        return c.used_blocks + c.draft_used_blocks, c.total_blocks + c.draft_total_blocks

    def close(self) -> None:
        self.engine.close()
        self.gguf.close()
        self.file_guard.close()
        if self.draft is not None:
            self.draft.gguf.close()
            self.draft.file_guard.close()
