"""The speculative cost model and the adaptive draft-length controller, fed with synthetic timings."""

from __future__ import annotations

import pytest

from ripelm.runtime.errors import BadSamplingError
from ripelm.runtime.spec_control import DraftPolicy, SpecController, expected_tokens, predicted_speedup


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens(1.0, 4) == pytest.approx(5.0, rel=1e-4)
    a = 0.8
    assert expected_tokens(a, 3) == pytest.approx(1 + a + a**2 + a**3)


def test_predicted_speedup():
    # free draft, free extra verify rows, perfect acceptance: k + 1 tokens per target pass
    assert predicted_speedup(1.0, 4, 10.0, 0.0, 10.0) == pytest.approx(5.0, rel=1e-4)
    # a draft as costly as the target can never pay, whatever the acceptance
    for k in range(1, 9):
        assert predicted_speedup(1.0, k, 10.0, 10.0, 10.0) <= 1.0 + 1e-6
    assert predicted_speedup(0.9, 0, 10.0, 1.0, 10.0) == pytest.approx(1.0)


def feed(ctl: SpecController, c_t: float, c_d: float, slope: float, acceptance: float, rounds: int) -> None:
    """Simulate `rounds` rounds of the controller's choices with fixed costs and acceptance."""
    for _ in range(rounds):
        k = ctl.next_k()
        for _ in range(k):
            ctl.record_draft(c_d)
        ctl.record_verify(k + 1, c_t + slope * k)
        acc = round(acceptance * k)
        ctl.record_round(k, acc, acc + 1)


def test_cheap_accurate_draft_gets_a_long_draft():
    ctl = SpecController()
    feed(ctl, c_t=0.030, c_d=0.005, slope=0.001, acceptance=0.9, rounds=40)
    assert not ctl.off
    assert ctl.k >= 4
    assert ctl.speedup(ctl.k) > 1.8


def test_draft_as_slow_as_target_turns_speculation_off_and_says_so():
    ctl = SpecController()
    feed(ctl, c_t=0.020, c_d=0.020, slope=0.0005, acceptance=1.0, rounds=10)
    assert ctl.off
    assert ctl.next_k() == 0
    assert ctl.note.startswith("speculation off")


def test_off_controller_probes_now_and_then_and_comes_back():
    pol = DraftPolicy(probe_every=16)
    ctl = SpecController(pol)
    feed(ctl, c_t=0.020, c_d=0.020, slope=0.0005, acceptance=1.0, rounds=10)
    assert ctl.off
    ks = []
    for _ in range(40):  # plain steps emit one token each; a probe drafts one token
        k = ctl.next_k()
        ks.append(k)
        if k:
            ctl.record_draft(0.020)
        ctl.record_verify(k + 1, 0.020)
        ctl.record_round(k, k, k + 1)
    assert 1 <= sum(ks) <= 3
    # the draft becomes cheap (e.g. the machine's other load moved): probes turn speculation back on once
    # their timings are the median of the window
    for _ in range(200):
        k = ctl.next_k()
        for _ in range(k):
            ctl.record_draft(0.002)
        ctl.record_verify(k + 1, 0.020)
        ctl.record_round(k, k, k + 1)
    assert not ctl.off and ctl.k >= 1


def test_low_acceptance_shrinks_k():
    hi, lo = SpecController(), SpecController()
    feed(hi, c_t=0.030, c_d=0.004, slope=0.002, acceptance=0.95, rounds=40)
    feed(lo, c_t=0.030, c_d=0.004, slope=0.002, acceptance=0.35, rounds=40)
    assert lo.k < hi.k


def test_fixed_k_is_kept_and_first_rounds_measure_the_target():
    ctl = SpecController(DraftPolicy(fixed_k=3))
    feed(ctl, c_t=0.02, c_d=0.02, slope=0.0, acceptance=0.0, rounds=5)
    assert ctl.next_k() == 3 and not ctl.off
    adaptive = SpecController()
    assert adaptive.next_k() == 0  # no single-token target cost measured yet
    adaptive.record_verify(1, 0.5)
    assert adaptive.next_k() == 0  # the first sample is a cold call: more are needed
    adaptive.record_verify(1, 0.02)
    assert adaptive.next_k() == 0
    adaptive.record_verify(1, 0.03)
    assert adaptive.next_k() == adaptive.policy.k_init
    assert adaptive.verify_cost[1] == pytest.approx(0.025)  # the cold call is dropped


@pytest.mark.parametrize(
    "policy",
    [
        DraftPolicy(fixed_k=-1),
        DraftPolicy(k_max=0),
        DraftPolicy(k_init=9, k_max=8),
        DraftPolicy(min_confidence=1.5),
    ],
)
def test_bad_policies_are_errors(policy):
    with pytest.raises(BadSamplingError):
        SpecController(policy)
