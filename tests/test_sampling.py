"""Sampling filters, seeded reproducibility, repetition penalty and stop strings."""

import pytest
import torch

from ripelm.runtime.errors import BadSamplingError
from ripelm.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, filtered_probs
from ripelm.runtime.stopping import StopStrings


def test_greedy_is_argmax_whatever_the_filters():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    s = Sampler(SamplingParams(temperature=0, top_k=1, top_p=0.1, seed=1))
    assert s(logits, []) == 1


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0))
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=1e-6)
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0))
    assert (p > 0).tolist() == [True, True, True, False, False]  # 0.5 + 0.25 < 0.8 needs the third
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2))
    assert (p > 0).tolist() == [True, True, True, False, False]  # 0.07 < 0.2 * 0.5
    assert torch.isclose(p.sum(), torch.tensor(1.0))


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    hot = filtered_probs(logits, SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0))
    cold = filtered_probs(logits, SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0))
    assert cold[0] > hot[0] > 0.5


def test_seed_reproducible_and_draws_follow_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = [Sampler(params)(logits, []) for _ in range(1)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(logits, []) for _ in range(2000)]
    seq2 = [s2(logits, []) for _ in range(2000)]
    assert seq1 == seq2 and a[0] == seq1[0]
    freq = torch.bincount(torch.tensor(seq1), minlength=3).float() / 2000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_repetition_penalty():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(min_p=1.0),
        dict(top_k=-1),
        dict(repetition_penalty=0),
        dict(max_tokens=0),
    ],
)
def test_bad_settings_raise(kw):
    with pytest.raises(BadSamplingError):
        SamplingParams(**kw).validate()


def test_stop_strings_across_chunks_and_holdback():
    s = StopStrings(["</end>", "STOP"])
    out = s.feed("hello </e") + s.feed("nd> never")
    assert out == "hello " and s.hit == "</end>"
    s = StopStrings(["STOP"])
    assert s.feed("ST") == ""  # could be the start of STOP: held back
    assert s.feed("ring") == "STring"
    assert s.feed("x S") == "x "
    assert s.flush() == "S"
    assert StopStrings([]).feed("abc") == "abc"
