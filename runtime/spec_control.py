"""How many tokens to draft: the speculative decoding cost model and the adaptive draft-length controller.

With a per-token acceptance probability a, drafting k tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens per
target pass on average, for k draft forwards plus one target pass over k + 1 positions. Decoding speed
relative to the target alone is therefore

    speedup(k) = E(k) * c_t / (k * c_d + c_v(k + 1))

with c_t the target's cost for one token, c_d the draft's and c_v(m) a target pass over m positions.
`SpecController` measures these costs and the acceptance rate as generation goes, picks the k that
maximizes the predicted speedup (k = 0 is plain decoding), and turns speculation off when no k is
predicted to pay; while off it drafts one token now and then to re-measure. Drafting also stops early
within a round when the draft's top probability falls below `min_confidence`.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

DECAY = 0.98  # per verified draft token: the acceptance estimate follows the last ~50 tokens
PRIOR_TOKENS = 4.0  # weight of the prior acceptance (in tokens) until real ones outweigh it
WINDOW = 9  # timings kept per measured quantity; the median of these is the estimate
# A verify pass has k + 1 rows; up to 16 the attention kernel computes each row exactly as decoding it alone
# (ripelm.kernels.attention.ROWWISE_MAX_ROWS), which greedy decoding's token-for-token identity relies on.
MAX_K = 15
BASELINE_SAMPLES = 2  # plain target steps timed (after a discarded first one) before any draft
REMEASURE_EVERY = 32  # while speculating, one plain step per this many rounds re-times the target
# Until a pass of m rows has TRUSTED_SAMPLES timings, its cost is at least c_t (1 + ROW_PRIOR (m - 1)): one
# early sample on a busy machine can come out below a one-row step (seen: 2 rows at 0.82 of one, on a
# prompt whose proposals were then accepted 7% of the time), which kept a losing sequence speculating. On
# the 2-core AVX2 machine a verified row costs 0.2 to 0.35 of a one-row step; a GPU or a large
# memory-bound model costs less, and measures it within a few rounds.
ROW_PRIOR = 0.25
TRUSTED_SAMPLES = 3


class Timing:
    """Median of the last WINDOW samples, robust to a busy machine; the very first sample (a new shape's
    kernel setup) only counts until a second one arrives."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=WINDOW)
        self.count = 0

    def add(self, seconds: float) -> None:
        if self.count == 1:
            self.samples.clear()
        self.samples.append(seconds)
        self.count += 1

    @property
    def value(self) -> float:
        return statistics.median(self.samples)


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens emitted per target pass with k drafts and i.i.d. per-token acceptance `acceptance`."""
    a = min(max(acceptance, 0.0), 0.999999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def predicted_speedup(acceptance: float, k: int, c_target: float, c_draft: float, c_verify: float) -> float:
    """Decode speed with k drafts relative to the target alone (costs in any one unit of time)."""
    if k == 0:
        return c_target / c_verify if c_verify > 0 else 1.0
    return expected_tokens(acceptance, k) * c_target / (k * c_draft + c_verify)


@dataclass
class DraftPolicy:
    """Settings of the controller. `fixed_k` pins the draft length (no adaptation, never off)."""

    k_max: int = 8
    k_init: int = 4
    fixed_k: int | None = None
    # stop drafting when the draft's top probability is below this (0: never). Measured on the bundled
    # model (f32 target, Q4_1 draft, greedy): 0.3 lost 15% against no threshold, 0.1 stayed within noise.
    min_confidence: float = 0.1
    min_gain: float = 1.15  # turn speculation (back) on only when predicted to be this much faster
    off_below: float = 1.10  # turn it off when no draft length is predicted to be faster than this
    probe_every: int = 64  # while off, one draft round every this many tokens
    prior_acceptance: float = 0.7

    def validate(self) -> None:
        from ripelm.runtime.errors import BadSamplingError

        if self.fixed_k is not None and not 0 <= self.fixed_k <= MAX_K:
            raise BadSamplingError(f"draft length must be in 0..{MAX_K}, got {self.fixed_k}")
        if not 1 <= self.k_max <= MAX_K or not 1 <= self.k_init <= self.k_max:
            raise BadSamplingError(
                f"draft lengths must satisfy 1 <= k_init <= k_max <= {MAX_K} "
                f"(k_init {self.k_init}, k_max {self.k_max})"
            )
        if not 0.0 <= self.min_confidence < 1.0:
            raise BadSamplingError(f"draft confidence threshold must be in [0, 1), got {self.min_confidence}")


@dataclass
class SpecController:
    """Running costs (seconds) and acceptance, and the draft length they call for."""

    policy: DraftPolicy = field(default_factory=DraftPolicy)
    draft_timing: Timing = field(default_factory=Timing)  # one draft forward of one token
    verify_timing: dict[int, Timing] = field(default_factory=dict)  # a target pass over m positions
    rejections: int = 0
    _tested: float = 0.0  # recent drafts that were verified (accepted, or the one rejected), fading
    _passed: float = 0.0  # ... and those accepted
    drafted: int = 0
    accepted: int = 0
    k: int = 0
    off: bool = False
    since_probe: int = 0
    rounds_on: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        self.policy.validate()
        self.k = self.policy.fixed_k if self.policy.fixed_k is not None else self.policy.k_init

    # -- measurements ------------------------------------------------------------------------------

    def record_draft(self, seconds: float) -> None:
        self.draft_timing.add(seconds)

    def record_verify(self, m: int, seconds: float) -> None:
        self.verify_timing.setdefault(m, Timing()).add(seconds)

    @property
    def draft_cost(self) -> float | None:
        return self.draft_timing.value if self.draft_timing.samples else None

    @property
    def verify_cost(self) -> dict[int, float]:
        return {m: t.value for m, t in self.verify_timing.items()}

    def record_round(self, drafted: int, accepted: int, emitted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        rejected = int(accepted < drafted)  # a round stops at its first rejection: later drafts are untested
        self.rejections += rejected
        if drafted:
            fade = DECAY ** (accepted + rejected)
            self._tested = fade * self._tested + accepted + rejected
            self._passed = fade * self._passed + accepted
        self.since_probe += emitted
        if drafted:  # a plain step teaches nothing about acceptance: the choice waits for the next round
            self._decide()

    @property
    def acceptance(self) -> float | None:
        """Per-token acceptance probability: accepted / (accepted + rejected) over the recent tokens (the
        maximum-likelihood estimate under the model's i.i.d. acceptance), starting from a weak prior."""
        if self.drafted == 0:
            return None
        prior = PRIOR_TOKENS * DECAY**self._tested
        return (self._passed + prior * self.policy.prior_acceptance) / (self._tested + prior)

    # -- the model -----------------------------------------------------------------------------------

    def verify_estimate(self, m: int, costs: dict[int, float] | None = None) -> float | None:
        """c_v(m): measured if seen, else a least-squares line through the measured sizes (`costs`: the
        medians, when the caller has them already); for m > 1 at least ROW_PRIOR's line until trusted."""
        costs = self.verify_cost if costs is None else costs
        estimate = self._fit(m, costs)
        seen = self.verify_timing.get(m)
        untrusted = seen is None or seen.count < TRUSTED_SAMPLES + 1  # its first timing is discarded
        if estimate is not None and m > 1 and 1 in costs and untrusted:
            estimate = max(estimate, costs[1] * (1.0 + ROW_PRIOR * (m - 1)))
        return estimate

    @staticmethod
    def _fit(m: int, costs: dict[int, float]) -> float | None:
        if m in costs:
            return costs[m]
        pts = sorted(costs.items())
        if not pts:
            return None
        if len(pts) == 1:
            return pts[0][1]  # no slope known yet: a flat cost (optimistic for larger m, corrected soon)
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in pts) / sxx)
        return max(1e-9, my + slope * (m - mx))

    def speedup(self, k: int, costs: dict[int, float] | None = None) -> float | None:
        costs = self.verify_cost if costs is None else costs
        c_t, c_v = self.verify_estimate(1, costs), self.verify_estimate(k + 1, costs)
        if c_t is None or c_v is None or self.draft_cost is None:
            return None
        a = self.acceptance if self.acceptance is not None else self.policy.prior_acceptance
        return predicted_speedup(a, k, c_t, self.draft_cost, c_v)

    def _decide(self) -> None:
        pol = self.policy
        if pol.fixed_k is not None:
            return
        if 1 not in self.verify_timing or self.draft_cost is None:
            return  # not enough measured yet: keep k
        best_k, best = 1, 0.0
        costs = self.verify_cost  # the medians once, not per k: this runs every round
        for k in range(1, pol.k_max + 1):
            s = self.speedup(k, costs)
            if s is not None and s > best:
                best_k, best = k, s
        # hysteresis: a noisy timing near break-even must not flip speculation on and off
        if best < (pol.min_gain if self.off else pol.off_below):
            if not self.off:
                self.note = (
                    f"speculation off: predicted {best:.2f}x at best, k={best_k} (draft "
                    f"{self._ms(self.draft_cost)}, "
                    f"target {self._ms(self.verify_estimate(1))} per token, acceptance "
                    f"{(self.acceptance or 0) * 100:.0f}%)"
                )
            self.off = True
            return
        if self.off:
            self.note = f"speculation back on at k={best_k} (predicted {best:.2f}x)"
        self.off = False
        self.k = best_k

    @staticmethod
    def _ms(seconds: float | None) -> str:
        return "?" if seconds is None else f"{seconds * 1000:.1f} ms"

    def next_k(self) -> int:
        """Draft tokens for the next round (0: a plain target step)."""
        if self.policy.fixed_k is not None:
            return self.policy.fixed_k
        plain = self.verify_timing.get(1)
        if plain is None or plain.count < BASELINE_SAMPLES + 1:
            return 0  # measure the target's single-token cost first: the baseline every choice is judged by
        if self.off:
            if self.since_probe >= self.policy.probe_every:
                self.since_probe = 0
                return 1
            return 0
        self.rounds_on += 1
        if self.rounds_on % REMEASURE_EVERY == 0:
            return 0  # keep the baseline current: the machine's load changes
        return self.k

    def summary(self) -> str:
        k = self.policy.fixed_k if self.policy.fixed_k is not None else self.k
        # a prediction needs the target's own single-token cost, which a pinned k never measures
        s = self.speedup(k) if k and 1 in self.verify_timing else None
        state = "off" if self.off else f"k={k}"
        pred = f", predicted {s:.2f}x" if s is not None else ""
        return f"{state}{pred}"
