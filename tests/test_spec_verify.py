"""The speculative acceptance math on random distributions: exactness of the emitted tokens' distribution.

A toy target and draft are Markov chains over a small vocabulary (next-token tables P and Q). Speculating
k tokens per row over a large batch, the first and second emitted tokens must follow the target chain:
a chi-square goodness-of-fit test at significance 0.001, with fixed seeds (deterministic).
"""

from __future__ import annotations

import pytest
import torch

from ripelm.runtime.spec_verify import verify_greedy, verify_sampled

ALPHA = 0.001  # significance of every goodness-of-fit test here


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test; cells expected below 5 counts are pooled into one.

    A count in a cell of probability 0 fails outright (p-value 0)."""
    n = observed.sum()
    exp = expected_probs.double() * n
    obs = observed.double()
    impossible = exp == 0
    if obs[impossible].sum() > 0:
        return 0.0
    exp, obs = exp[~impossible], obs[~impossible]
    small = exp < 5
    if small.any():
        exp = torch.cat([exp[~small], exp[small].sum().view(1)])
        obs = torch.cat([obs[~small], obs[small].sum().view(1)])
    stat = ((obs - exp) ** 2 / exp).sum()
    df = exp.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


def random_chain(v: int, gen: torch.Generator, sharpness: float) -> torch.Tensor:
    return torch.softmax(torch.randn(v, v, generator=gen, dtype=torch.float64) * sharpness, -1).float()


def speculate_chain(P, Q, first, k, gen, lengths=None):
    """One speculative round per row starting after token `first`: returns the emitted tokens per row."""
    b = first.shape[0]
    drafts, qs, prev = [], [], first
    for _ in range(k):
        q = Q[prev]
        x = torch.multinomial(q, 1, generator=gen).squeeze(-1)
        drafts.append(x)
        qs.append(q)
        prev = x
    d = torch.stack(drafts, 1) if k else torch.zeros(b, 0, dtype=torch.long)
    q = torch.stack(qs, 1) if k else torch.zeros(b, 0, P.shape[0])
    ctx = torch.cat([first[:, None], d], 1)  # token before each verified position
    p = P[ctx]  # [B, k+1, V]
    return verify_sampled(d, q, p, gen, lengths), d


@pytest.mark.parametrize("k", [1, 3, 5])
def test_emitted_tokens_follow_the_target_chain(k):
    v, b = 8, 120_000
    gen = torch.Generator().manual_seed(1234 + k)
    P = random_chain(v, gen, 1.5)
    Q = random_chain(v, gen, 1.5)  # an unrelated draft: frequent rejections
    start = torch.randint(0, v, (b,), generator=gen)
    verdict, drafts = speculate_chain(P, Q, start, k, gen)
    emitted = verdict.tokens(drafts)
    rejected = (verdict.n_accepted < k).float().mean()
    assert 0.2 < float(rejected) < 1.0  # both paths (residual resampling and bonus token) are exercised
    # first emitted token: one cell per (start, token); expected P[start, token]
    first = torch.tensor([e[0] for e in emitted])
    obs = torch.bincount(start * v + first, minlength=v * v)
    expect = (torch.bincount(start, minlength=v).double()[:, None] * P.double()).reshape(-1) / b
    assert chi_square_p_value(obs, expect) > ALPHA
    # second emitted token (rows that emitted two): its distribution given the first is P[first]
    two = [i for i, e in enumerate(emitted) if len(e) >= 2]
    f = first[two]
    second = torch.tensor([emitted[i][1] for i in two])
    obs2 = torch.bincount(f * v + second, minlength=v * v)
    expect2 = (torch.bincount(f, minlength=v).double()[:, None] * P.double()).reshape(-1) / len(two)
    assert chi_square_p_value(obs2, expect2) > ALPHA


def test_identical_draft_is_always_accepted_and_bonus_follows_p():
    v, b, k = 6, 50_000, 4
    gen = torch.Generator().manual_seed(7)
    P = random_chain(v, gen, 1.0)
    start = torch.zeros(b, dtype=torch.long)
    verdict, drafts = speculate_chain(P, P, start, k, gen)
    assert bool((verdict.n_accepted == k).all())
    last = drafts[:, -1]
    obs = torch.bincount(last * v + verdict.next_token, minlength=v * v)
    expect = (torch.bincount(last, minlength=v).double()[:, None] * P.double()).reshape(-1) / b
    assert chi_square_p_value(obs, expect) > ALPHA


def test_per_row_draft_lengths_and_k_zero():
    v, b = 5, 60_000
    gen = torch.Generator().manual_seed(11)
    P = random_chain(v, gen, 1.2)
    Q = random_chain(v, gen, 1.2)
    start = torch.randint(0, v, (b,), generator=gen)
    lengths = torch.randint(0, 4, (b,), generator=gen)
    verdict, drafts = speculate_chain(P, Q, start, 3, gen, lengths)
    assert bool((verdict.n_accepted <= lengths).all())
    emitted = verdict.tokens(drafts)
    first = torch.tensor([e[0] for e in emitted])
    obs = torch.bincount(start * v + first, minlength=v * v)
    expect = (torch.bincount(start, minlength=v).double()[:, None] * P.double()).reshape(-1) / b
    assert chi_square_p_value(obs, expect) > ALPHA
    # k = 0: a plain draw from p
    verdict0, _ = speculate_chain(P, Q, start, 0, gen)
    assert bool((verdict0.n_accepted == 0).all())
    obs0 = torch.bincount(start * v + verdict0.next_token, minlength=v * v)
    assert chi_square_p_value(obs0, expect) > ALPHA


def test_zero_target_probability_is_never_accepted():
    p = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    q = torch.tensor([[[1.0, 0.0]]])
    for seed in range(20):
        v = verify_sampled(torch.tensor([[0]]), q, p, torch.Generator().manual_seed(seed))
        assert v.n_accepted.tolist() == [0] and v.next_token.tolist() == [1]


def test_greedy_accepts_the_matching_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 2, 3]])
    choice = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [4, 4, 4, 4]])
    v = verify_greedy(drafts, choice)
    assert v.n_accepted.tolist() == [3, 1, 0]
    assert v.tokens(drafts) == [[5, 6, 7, 8], [5, 6], [4]]
    short = verify_greedy(drafts, choice, lengths=torch.tensor([1, 3, 0]))
    assert short.tokens(drafts) == [[5, 6], [5, 6], [4]]


def test_shape_and_length_errors():
    with pytest.raises(ValueError):
        verify_sampled(torch.zeros(1, 2, dtype=torch.long), torch.rand(1, 2, 4), torch.rand(1, 2, 4))
    with pytest.raises(ValueError):
        verify_greedy(
            torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), torch.tensor([3])
        )
