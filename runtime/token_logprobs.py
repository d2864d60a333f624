"""Log-probabilities of emitted tokens (OpenAI's `logprobs` / `top_logprobs`).

They are the model's own distribution: log-softmax of the step's raw logits row, before the repetition
penalty, temperature, top-k/p filtering or a grammar mask (as vLLM and llama.cpp's server report them), so
the figure for a token does not depend on how it was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the `top` most likely tokens, best first


def token_logprobs(rows: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """One entry per token: rows[i] ([N, V] logits) is the row token i was chosen from."""
    lp = torch.log_softmax(rows[: len(tokens)].float(), dim=-1)
    out = []
    for i, tok in enumerate(tokens):
        best: list[tuple[int, float]] = []
        if top > 0:
            vals, idx = torch.topk(lp[i], top)
            best = [(int(t), float(v)) for t, v in zip(idx, vals, strict=True)]
        out.append(TokenLogprob(int(tok), float(lp[i, tok]), best))
    return out
