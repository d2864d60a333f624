"""Speculation inside the engine: a kind of decode step, not a second engine.

A request submitted with `speculate="ngram"` gets a proposer (prompt lookup, `runtime.proposer`) and a
controller (`start`); at each decode step the scheduler asks the controller how many tokens to propose and the
proposer for them, and reserves their positions. The step then runs ONE target forward over every row: the
last token of each plain sequence, and for a speculating sequence its last token followed by its proposed
tokens, each row at its own position with the sequence's block table (`runtime.step_forward`). All rows
write their K/V into the paged pool. Per speculating sequence the exact rules of `spec_verify` accept a
prefix of the proposal (`judge`; greedy: while it is the target's argmax; sampling: the proposal is a
point-mass draft, so x is accepted with probability p(x) and a rejection is followed by a draw from p with x
removed and renormalized: the emitted token follows p), the allocator truncates the rejected positions away,
and the accepted tokens plus the target's next token are emitted one by one through the same path as a
sampled token, so an end-of-generation token or the token budget ends the sequence exactly where plain
decoding would. Greedy output is therefore token for token the output without speculation, and sampled
output has the same distribution. Stop strings are cut by the reader, as always.

Under a grammar (structured output, `Sequence.constraint`) proposals are masked too: the draft model draws
them from its masked distribution (`runtime.draft_runner`), a prompt-lookup proposal is cut at its first
token the grammar forbids (`grammar_prefix`), and the target verifies row i under the mask of the grammar's
state after the first i proposed tokens (`judge`, which rolls the matcher back after computing the masks;
`accept` then advances it over the emitted tokens). A masked row is what plain constrained sampling draws
from, so the output is again the same (greedy) or has the same distribution (sampled).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ripelm.runtime.block_allocator import BlockAllocator
from ripelm.runtime.proposer import DraftModelProposer, NgramProposer, Proposer
from ripelm.runtime.sampling import filtered_probs, penalized_logits
from ripelm.runtime.sequence import Sequence, SpecTally
from ripelm.runtime.spec_control import DraftPolicy, SpecController
from ripelm.runtime.spec_verify import verify_greedy, verify_sampled

if TYPE_CHECKING:
    from ripelm.runtime.scheduler import StepPlan

SPECULATE_MODES = ("off", "ngram", "draft", "auto")
DEFAULT_SPEC_K = 8  # most tokens proposed per decode step of a speculating sequence (the controller picks)
SPEC_MAX_ROWS = 16  # rows of a decode step that verifies proposals (the native step's batch)
NGRAM_SIZES = (3, 4)  # prompt lookup's shortest and longest match (see `start`)


def start(seq: Sequence, k: int, adaptive: bool, mode: str = "ngram") -> None:
    """Give `seq` a proposer and a controller. mode "ngram": prompt lookup of its own (its index covers this
    sequence's tokens only); it costs nothing to draft, so a proposal pays when the expected accepted tokens
    outweigh what its extra rows add to the step (`spec_control`; the step costs it learns are those of the
    steps this sequence takes part in). mode "draft": the engine's draft model (`runtime.draft_runner`), whose
    measured cost per draft forward enters the same cost model. `adaptive=False` always proposes k (when
    prompt lookup has a match). mode "auto": both, the draft model and prompt lookup, each with its own
    controller; every step `choose` picks one (`Sequence.alternatives`)."""
    if mode == "auto":
        start(seq, k, adaptive, "draft")
        draft = (seq.proposer, seq.controller)
        start(seq, k, adaptive, "ngram")
        seq.alternatives = [draft, (seq.proposer, seq.controller)]
        seq.spec = SpecTally(proposer="draft+ngram")
        return
    if mode == "draft":
        policy = DraftPolicy(
            k_max=k,
            k_init=min(k, 4),
            fixed_k=None if adaptive else k,
            min_confidence=0.1 if adaptive else 0.0,
        )
        seq.proposer, seq.spec_k, seq.controller = DraftModelProposer(), k, SpecController(policy)
        seq.spec = SpecTally(proposer="draft")
        return
    # Matches of 3 or 4 tokens only, at a prior acceptance of 0.7. Chosen by replaying the controller over
    # recorded greedy outputs (23 `ripe ask` answers over ../shared/seeds, 10 open-ended chat replies; the
    # bundled model) with verify costs of 1 + r(m - 1) target steps for m rows: at r = 0.3 (this AVX2
    # machine's 2-thread native step) ask gains a median 1.71x against 1.59x with matches of 2..3 tokens
    # and a 0.5 prior, at r = 0.4 1.53x against 1.19x, at r = 0.2 2.10x against 2.02x; chat stays within
    # 1.1% of plain decoding in every case. Shorter matches are accepted too rarely to pay for their rows.
    proposer: Proposer = NgramProposer(min_n=NGRAM_SIZES[0], max_n=NGRAM_SIZES[1])
    policy = DraftPolicy(
        k_max=k,
        k_init=min(k, 2),
        min_confidence=0.0,
        prior_acceptance=0.7,
        fixed_k=None if adaptive else k,
    )
    ctl = SpecController(policy)
    ctl.record_draft(0.0)
    seq.proposer, seq.spec_k, seq.controller = proposer, k, ctl
    seq.spec = SpecTally(proposer=proposer.name)


def choose(seq: Sequence) -> None:
    """With both proposers (mode "auto"): prompt lookup where it has a match and is predicted to pay at
    least as well as the draft model (it costs no draft forwards), else the draft model."""
    if seq.alternatives is None:
        return
    (draft, draft_ctl), (lookup, lookup_ctl) = seq.alternatives
    use_lookup = False
    if not lookup_ctl.off and lookup.propose(seq.tokens, 1):
        ours, theirs = lookup_ctl.speedup(lookup_ctl.k), draft_ctl.speedup(draft_ctl.k)
        use_lookup = draft_ctl.off or theirs is None or (ours is not None and ours >= theirs)
    seq.proposer, seq.controller = (lookup, lookup_ctl) if use_lookup else (draft, draft_ctl)


def record_costs(plan: StepPlan, seconds: float) -> None:
    """Each speculating sequence's controller learns what a decode step with its rows cost (forward,
    sampling and verification: all that its proposals add) and, after a round that proposed, its state.
    With both proposers, the one not chosen learns the step's cost too (a step of m rows costs the same
    whoever proposed them)."""
    for seq, draft in zip(plan.seqs, plan.drafts, strict=True):
        ctl = seq.controller
        if ctl is None:
            continue
        for c in [c for _, c in seq.alternatives or []] or [ctl]:
            c.record_verify(1 + len(draft), seconds)
        if not draft:
            for c in [c for _, c in seq.alternatives or []] or [ctl]:
                c.record_round(0, 0, 1)
        elif seq.spec is not None:
            seq.spec.state = f"{seq.proposer.name} {ctl.summary()}" if seq.alternatives else ctl.summary()


def judge(seq: Sequence, draft: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """How many proposed tokens the target accepts, and its token after them.

    logits: [1 + k, V], row i scored after seq.tokens + draft[:i]. The target's token at each row is chosen
    as `Sampler` chooses (same repetition penalty history, same filtering, first maximum when greedy). A draft
    model's proposals come with the distributions q they were drawn from (`Sequence.draft_q`): x is accepted
    with probability min(1, p(x)/q(x)), a rejection draws from normalize(max(0, p - q)). A prompt-lookup
    proposal is a point mass: accepted with probability p(x), on rejection a draw from p with x removed.
    Either way each emitted token follows p exactly.
    """
    params = seq.params
    k = len(draft)
    hists = None
    if params.repetition_penalty != 1.0:
        tail = seq.tokens[-params.repeat_last_n :]
        hists = [tail + draft[:i] for i in range(k + 1)]
    z = penalized_logits(logits.cpu(), params, hists)
    if seq.constraint is not None:
        z = _masked_rows(seq, draft, z)
    x = torch.tensor([draft], dtype=torch.long)
    if params.greedy:
        choice = torch.from_numpy(z.numpy().argmax(-1)).long()  # numpy's argmax, as the Sampler's
        verdict = verify_greedy(x, choice.unsqueeze(0))
    else:
        p = filtered_probs(z, params)
        q = seq.draft_q  # the draft model's distributions; prompt lookup's proposals are point masses
        if q is None:
            q = torch.zeros(k, p.shape[-1])
            q[torch.arange(k), x[0]] = 1.0
        verdict = verify_sampled(x, q.unsqueeze(0), p.unsqueeze(0), seq.sampler.generator)
    return int(verdict.n_accepted[0]), int(verdict.next_token[0])


def grammar_prefix(seq: Sequence, draft: list[int]) -> list[int]:
    """The proposal up to its first token the sequence's grammar forbids (all of it without a grammar); a
    draft model's distributions are cut to match."""
    c = seq.constraint
    if c is None or not draft:
        return draft
    n = c.matcher.validate_tokens(draft)
    if seq.draft_q is not None:
        seq.draft_q = seq.draft_q[:n] if n else None
    return draft[:n]


def _masked_rows(seq: Sequence, draft: list[int], z: torch.Tensor) -> torch.Tensor:
    """z with row i masked by the grammar's state after draft[:i] (the matcher is left where it was)."""
    c = seq.constraint
    assert c is not None
    masks, ahead = [torch.from_numpy(c.allowed())], 0
    for tok in draft:  # every proposed token is allowed (`grammar_prefix`)
        if ahead < len(masks) - 1 or not c.look_ahead(tok):  # past an end token: rows never emitted
            masks.append(masks[-1])
            continue
        ahead += 1
        masks.append(torch.from_numpy(c.allowed()))
    c.rollback(ahead)
    keep = torch.stack(masks)
    n = min(z.shape[-1], keep.shape[-1])
    out = torch.full_like(z, float("-inf"))
    out[:, :n] = torch.where(keep[:, :n], z[:, :n], out[:, :n])
    return out


def accept(allocator: BlockAllocator, counters, seq: Sequence, draft: list[int], logits: torch.Tensor):  # noqa: ANN001
    """The tokens a decode step emits for a speculating sequence: the accepted prefix of its proposal
    (`judge`) and the target's token after it. Commits the accepted rows' K/V and truncates the rest away
    (the rejected rows' K/V stay in the pool past the table's end, never read, overwritten by the next step;
    their blocks never enter the prefix cache); updates the controller and the figures."""
    k = len(draft)
    start = len(seq.tokens) - 1  # position of the first row
    n, nxt = judge(seq, draft, logits)
    if seq.constraint is not None:  # the grammar moves on over the emitted tokens
        for tok in draft[:n] + [nxt]:
            seq.constraint.consume(tok)
    allocator.commit(seq.table, [seq.tokens[start]] + draft[:n])
    allocator.truncate(seq.table, start + 1 + n)
    if seq.controller is not None:
        seq.controller.record_round(k, n, n + 1)
    if seq.spec is not None:
        seq.spec.rounds += 1
        seq.spec.proposed += k
        seq.spec.accepted += n
    counters.spec_rounds += 1
    counters.spec_proposed += k
    counters.spec_accepted += n
    return draft[:n] + [nxt]
