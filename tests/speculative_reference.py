"""Speculative decoding for one sequence: a draft model proposes tokens, the target verifies them in one pass.

A reference for tests (the product speculates inside the engine: `runtime.engine_spec`,
`runtime.draft_runner`). `SpeculativeBackend` drives two `NativeBackend`s (target and draft) through
their public API (`prefill`, `forward`, `cache.truncate` + `cached_tokens` for rollback) and is itself a
`Backend`, so the shared `stream()` pipeline (stop strings, budgets, stats) runs on it unchanged.

Invariant between rounds, with `seq` the prompt plus every emitted token: the target's cache holds
seq[:-1] (the last token is pending), the draft's cache holds a prefix of seq. A round feeds the draft
what it lacks, drafts up to k tokens (`SpecController` picks k; drafting stops early on low draft
confidence), runs the target once over [seq[-1], x_1..x_L] for L + 1 distributions, accepts a prefix
(`spec_verify`), and truncates both caches back to the accepted tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ripelm.runtime.backend import Capabilities, GenerationStats
from ripelm.runtime.draft_pairing import check_vocab
from ripelm.runtime.sampling import SamplingParams, penalized_logits, token_probs
from ripelm.runtime.spec_control import DraftPolicy, SpecController
from ripelm.runtime.spec_verify import verify_greedy, verify_sampled

if TYPE_CHECKING:
    from native_reference import NativeBackend


def _hold(backend: NativeBackend, tokens: list[int]) -> int:
    """Make `backend`'s cache hold exactly `tokens` (reusing a common prefix); returns how many it reused."""
    if not tokens:
        backend.cache.truncate(0)
        backend.cached_tokens.clear()
        return 0
    _, reused = backend.prefill(tokens)
    return reused


def _rewind(backend: NativeBackend, length: int) -> None:
    if len(backend.cached_tokens) > length:
        backend.cache.truncate(length)
        del backend.cached_tokens[length:]


class SpeculativeBackend:
    """A target `NativeBackend` sped up by a draft `NativeBackend` of the same vocabulary."""

    name = "native+draft"
    caps = Capabilities()

    def __init__(
        self,
        target: NativeBackend,
        draft: NativeBackend,
        policy: DraftPolicy | None = None,
        *,
        owns_models: bool = True,
    ):
        check_vocab(target.gguf, draft.gguf)
        self.target, self.draft = target, draft
        self.controller = SpecController(policy or DraftPolicy())
        self.owns_models = owns_models
        self.tokenizer = target.tokenizer
        self.template = target.template
        self.context_length = min(target.context_length, draft.context_length)
        self.device = target.device
        self.vocab = min(target.cfg.vocab_size, draft.cfg.vocab_size)

    def _logits(self, backend: NativeBackend, tokens: list[int], start: int, rows: str) -> torch.Tensor:
        out = backend.forward(tokens, start, logits_rows=rows)
        return out[..., : self.vocab].float().cpu()  # the copy to the CPU also waits for a GPU to finish

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        params.validate()
        self.target.file_guard.check()
        self.draft.file_guard.check()
        ctl = self.controller
        gen = torch.Generator()
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        # The first token comes from the target's prefill as without a draft (same rows, same numerics).
        logits, stats.cached_tokens = self.target.prefill(prompt)
        stats.target_forwards += 1
        z = penalized_logits(logits[: self.vocab].float().cpu(), params, [prompt])
        first = (
            int(z.argmax())
            if params.greedy
            else int(torch.multinomial(token_probs(z, params), 1, generator=gen))
        )
        _hold(self.draft, prompt)
        if ctl.policy.fixed_k == 0:
            stats.speculation = "speculation disabled (draft length 0)"
        seq = list(prompt)
        new = [first]
        while True:
            for tok in new:
                stats.emitted_tokens += 1
                seq.append(tok)
                yield tok
            if len(seq) >= self.context_length:
                return
            room = min(self.context_length - len(seq), params.max_tokens - (len(seq) - len(prompt)) - 1)
            k = max(0, min(ctl.next_k(), room))
            drafts, qs = self._draft(seq, k, params, gen, stats)
            new, n_acc = self._verify(seq, drafts, qs, params, gen, stats)
            ctl.record_round(len(drafts), n_acc, len(new))
            if ctl.policy.fixed_k != 0:
                stats.speculation = ctl.note or ctl.summary()

    def _draft(
        self, seq: list[int], k: int, params: SamplingParams, gen: torch.Generator, stats: GenerationStats
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Up to k draft tokens after `seq`, and the distributions they were drawn from (sampling only)."""
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        if k == 0:
            return drafts, qs
        d = self.draft
        feed = seq[len(d.cached_tokens) :]
        hist = seq if params.repetition_penalty != 1.0 else None
        threshold = self.controller.policy.min_confidence
        for _ in range(k):
            t0 = time.perf_counter()
            if len(feed) <= 2:
                logits = self._logits(d, feed, len(d.cached_tokens), "last")[-1]
                if len(feed) == 1:  # the cost model counts one-token draft steps
                    self.controller.record_draft(time.perf_counter() - t0)
            else:  # catching up on tokens decoded while speculation was off: a chunked prefill
                logits = d.prefill(seq)[0][: self.vocab].float().cpu()
            h = None if hist is None else [hist + drafts]
            if params.greedy:
                z = penalized_logits(logits, params, h)
                conf = float(torch.softmax(z, -1).max())
                tok = int(z.argmax())
            else:
                q = token_probs(logits, params, h)
                conf = float(q.max())
                tok = int(torch.multinomial(q, 1, generator=gen))
            if conf < threshold and drafts:
                break
            drafts.append(tok)
            if not params.greedy:
                qs.append(q)
            feed = [tok]
        return drafts, qs

    def _verify(
        self,
        seq: list[int],
        drafts: list[int],
        qs: list[torch.Tensor],
        params: SamplingParams,
        gen: torch.Generator,
        stats: GenerationStats,
    ) -> tuple[list[int], int]:
        """One target pass over [seq[-1], drafts]; returns the emitted tokens and how many drafts it kept."""
        start = len(seq) - 1
        t0 = time.perf_counter()
        logits = self._logits(self.target, [seq[-1], *drafts], start, "all")
        self.controller.record_verify(len(drafts) + 1, time.perf_counter() - t0)
        stats.target_forwards += 1
        hists = None
        if params.repetition_penalty != 1.0:
            hists = [seq + drafts[:i] for i in range(len(drafts) + 1)]
        x = torch.tensor([drafts], dtype=torch.long)
        if params.greedy:
            choice = penalized_logits(logits, params, hists).argmax(-1)
            verdict = verify_greedy(x, choice.unsqueeze(0))
        else:
            p = token_probs(logits, params, hists)
            q = torch.stack(qs) if qs else p.new_zeros((0, p.shape[-1]))
            verdict = verify_sampled(x, q.unsqueeze(0), p.unsqueeze(0), gen)
        n = int(verdict.n_accepted[0])
        new = drafts[:n] + [int(verdict.next_token[0])]
        stats.drafted += len(drafts)
        stats.accepted += n
        _rewind(self.target, start + 1 + n)
        _rewind(self.draft, len(seq) + n)
        return new, n

    def close(self) -> None:
        if self.owns_models:
            self.target.close()
            self.draft.close()
