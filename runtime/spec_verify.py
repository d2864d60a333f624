"""The acceptance step of speculative decoding, batched and device-agnostic.

A draft model proposed tokens x_1..x_L for each row (L may differ per row, at most k) from distributions
q_1..q_L; the target scored the same positions in one pass, giving p_1..p_{L+1}. Walking the row left to
right, x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); the first rejected position is
replaced by a draw from normalize(max(0, p_i - q_i)); if all L are accepted a bonus token is drawn from
p_{L+1}. Every emitted token is then distributed exactly as the target alone would have sampled it
(Leviathan et al. 2023, Chen et al. 2023). The greedy variant accepts while x_i is the target's argmax.

p and q must be the distributions tokens are really drawn from (after the same temperature, top-k/top-p/
min-p and repetition penalty: `ripelm.runtime.sampling.token_probs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    """Per row: how many draft tokens were accepted, and the token that follows them."""

    n_accepted: torch.Tensor  # int64 [B]
    next_token: torch.Tensor  # int64 [B]: the correction (after a rejection) or the bonus token

    def tokens(self, drafts: torch.Tensor) -> list[list[int]]:
        """Each row's emitted tokens: its accepted drafts, then the next token."""
        n = self.n_accepted.tolist()
        rows = drafts.tolist()
        return [row[:a] + [t] for row, a, t in zip(rows, n, self.next_token.tolist(), strict=True)]


def _lengths(drafts: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    b, k = drafts.shape
    if lengths is None:
        return torch.full((b,), k, dtype=torch.long, device=drafts.device)
    lengths = lengths.to(device=drafts.device, dtype=torch.long)
    if lengths.shape != (b,) or bool((lengths < 0).any()) or bool((lengths > k).any()):
        raise ValueError(f"draft lengths must be a [B] tensor with values in 0..{k}")
    return lengths


def _leading_true(ok: torch.Tensor) -> torch.Tensor:
    """Length of the run of True at the start of each row of a [B, k] bool tensor."""
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def verify_sampled(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
    lengths: torch.Tensor | None = None,
) -> Verdict:
    """Speculative sampling for a batch.

    drafts: int64 [B, k], the draft tokens (positions past a row's length are ignored);
    q: [B, k, V], the draft distributions they were drawn from; p: [B, k + 1, V], the target's
    distributions at the same positions plus one; lengths: [B] draft length per row (default k).
    `generator` must live on the tensors' device.
    """
    b, k = drafts.shape
    if q.shape[:2] != (b, k) or p.shape[:2] != (b, k + 1) or p.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"shapes do not match: drafts {tuple(drafts.shape)}, q {tuple(q.shape)}, p {tuple(p.shape)}"
        )
    lengths = _lengths(drafts, lengths)
    p, q = p.float(), q.float()
    idx = drafts.unsqueeze(-1)
    px = p[:, :k].gather(-1, idx).squeeze(-1)  # [B, k]
    qx = q.gather(-1, idx).squeeze(-1)
    u = torch.rand((b, k), generator=generator, device=p.device)
    # u < p/q, written without the division: accepts surely when p >= q, never when p = 0.
    ok = (u * qx < px) & (qx > 0)
    in_draft = torch.arange(k, device=p.device).unsqueeze(0) < lengths.unsqueeze(1)
    n = torch.minimum(_leading_true(ok | ~in_draft), lengths)
    rows = torch.arange(b, device=p.device)
    p_next = p[rows, n]  # [B, V]: target distribution at the first unaccepted position
    q_next = torch.zeros_like(p_next)
    rejected = n < lengths
    if k:
        q_next[rejected] = q[rows[rejected], n[rejected]]
    residual = (p_next - q_next).clamp_(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    # A rejection has probability sum(max(0, q - p)) = sum(max(0, p - q)), so a rejected row has mass > 0;
    # only rounding can empty it, and then p itself is the right distribution.
    dist = torch.where(mass > 1e-12, residual / mass.clamp(min=1e-30), p_next)
    nxt = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
    return Verdict(n, nxt)


def verify_greedy(
    drafts: torch.Tensor, target_choice: torch.Tensor, lengths: torch.Tensor | None = None
) -> Verdict:
    """Greedy verification: accept while each draft token equals the target's choice at its position.

    target_choice: int64 [B, k + 1], the target's argmax (after any repetition penalty) per position.
    """
    b, k = drafts.shape
    if target_choice.shape != (b, k + 1):
        raise ValueError(
            f"target choices must be [B, k + 1] = [{b}, {k + 1}], got {tuple(target_choice.shape)}"
        )
    lengths = _lengths(drafts, lengths)
    in_draft = torch.arange(k, device=drafts.device).unsqueeze(0) < lengths.unsqueeze(1)
    ok = (drafts == target_choice[:, :k]) | ~in_draft
    n = torch.minimum(_leading_true(ok), lengths)
    nxt = target_choice[torch.arange(b, device=drafts.device), n]
    return Verdict(n, nxt)
