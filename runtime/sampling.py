"""Sampling settings and next-token selection from logits.

Order of operations follows llama.cpp's default chain: repetition penalty, then top-k, top-p, min-p on
the tempered distribution, then a draw. Temperature 0 is greedy (argmax) and ignores the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the chat app shows its window before torch loads
    import torch


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    # structured output: (kind, text), kind one of runtime.grammar.GRAMMAR_KINDS ("json_schema" with the
    # schema as JSON text, "json_object", "regex", "lark", "gbnf"); None: free text
    grammar: tuple[str, str] | None = None
    # report each emitted token's log-probability and this many most likely alternatives (None: off;
    # `runtime.token_logprobs`)
    logprobs: int | None = None

    def validate(self) -> None:
        from ripelm.runtime.errors import BadSamplingError

        if not (self.temperature >= 0):
            raise BadSamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise BadSamplingError(f"top-k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise BadSamplingError(f"top-p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise BadSamplingError(f"min-p must be in [0, 1), got {self.min_p}")
        if not (self.repetition_penalty > 0):
            raise BadSamplingError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise BadSamplingError(f"max tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise BadSamplingError(f"top logprobs must be in 0..20, got {self.logprobs}")
        if self.grammar is not None:
            from ripelm.runtime.grammar import validate_grammar

            validate_grammar(self.grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens seen recently: divide positive logits, multiply negative ones."""
    if penalty == 1.0 or not recent:
        return logits
    import torch

    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a draw is made from: softmax(logits / T) restricted by top-k, top-p and min-p."""
    import torch

    logits = logits.float() / max(p.temperature, 1e-6)
    vocab = logits.shape[-1]
    k = p.top_k if 0 < p.top_k < vocab else vocab
    vals, idx = torch.topk(logits, k)  # sorted, descending
    probs = torch.softmax(vals, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_p < 1.0:
        cum = probs.cumsum(-1)
        keep &= (cum - probs) < p.top_p  # keep the smallest prefix reaching top_p (always the first)
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs[..., :1]
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True)
    out = torch.zeros_like(logits)
    return out.scatter_(-1, idx, probs)


def penalized_logits(
    logits: torch.Tensor, params: SamplingParams, histories: list[list[int]] | None = None
) -> torch.Tensor:
    """float32 logits after the repetition penalty; row i of a [N, V] batch uses `histories[i]`."""
    logits = logits.float()
    if params.repetition_penalty == 1.0 or histories is None:
        return logits
    n = params.repeat_last_n
    if logits.dim() == 1:
        return apply_repetition_penalty(logits, histories[0][-n:], params.repetition_penalty)
    import torch

    return torch.stack(
        [
            apply_repetition_penalty(row, h[-n:], params.repetition_penalty)
            for row, h in zip(logits, histories, strict=True)
        ]
    )


def token_probs(
    logits: torch.Tensor, params: SamplingParams, histories: list[list[int]] | None = None
) -> torch.Tensor:
    """The distribution a `Sampler` draws each row's token from ([V] or [N, V] logits, float32 out).

    Greedy settings give the one-hot of the argmax. Speculative decoding computes both the draft's q and
    the target's p with this one function, so both see exactly the same processing.
    """
    logits = penalized_logits(logits, params, histories)
    if params.greedy:
        import torch

        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filtered_probs(logits, params)


class Sampler:
    """Picks next tokens for one sequence; holds its own seeded generator so runs are reproducible."""

    def __init__(self, params: SamplingParams):
        import torch

        params.validate()
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        logits = penalized_logits(logits.cpu(), self.params, [history])
        if self.params.greedy:
            # numpy's argmax (first maximum, like torch's) takes ~3 us on a 49k vocabulary, torch's ~70 us
            return int(logits.float().numpy().argmax())
        probs = filtered_probs(logits, self.params)
        import torch

        return int(torch.multinomial(probs, 1, generator=self.generator))
