"""The pure sampling functions and the stop-string matcher."""

import math

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logits_to_probs,
    sample,
    top_logprobs,
)
from llamalab.generation.stopping import StopStringMatcher

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def test_temperature_one_without_filters_is_softmax():
    torch.testing.assert_close(logits_to_probs(LOGITS, 1.0), torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def test_top_k_top_p_min_p():
    assert (logits_to_probs(LOGITS, 1.0, top_k=2) > 0).tolist() == [True, True, False, False, False]
    # top-p 0.8: 0.5 + 0.25 < 0.8, so the third token is still needed to reach it.
    assert (logits_to_probs(LOGITS, 1.0, top_p=0.8) > 0).tolist() == [True, True, True, False, False]
    # min-p 0.3: keep tokens with at least 0.3 × the top probability (0.15).
    assert (logits_to_probs(LOGITS, 1.0, min_p=0.3) > 0).tolist() == [True, True, True, False, False]
    probs = logits_to_probs(LOGITS, 1.0, top_k=2)
    assert probs.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(probs[:2], torch.tensor([2 / 3, 1 / 3]))


def test_low_temperature_sharpens():
    cold = logits_to_probs(LOGITS, 0.1)
    assert cold[0] > 0.99


def test_repetition_penalty_follows_the_sign():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # pure: the input is untouched


def test_greedy_and_seeded_sampling():
    assert sample(LOGITS, SamplingParams(temperature=0)) == 0
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    draws = [sample(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) >= {0, 1, 2}
    again = [sample(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again


def test_logprobs():
    chosen, alternatives = top_logprobs(LOGITS, 1, 2)
    assert chosen == pytest.approx(math.log(0.25), abs=1e-6)
    assert [i for i, _ in alternatives] == [0, 1]


def test_invalid_params_are_errors():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"min_p": 2}, {"top_k": -1}, {"repeat_penalty": 0}):
        with pytest.raises(LlamalabError):
            SamplingParams(**kw)


def test_stop_string_split_across_deltas():
    m = StopStringMatcher(["</s>", "STOP"])
    out = [m.feed(d) for d in ["Hello S", "TO", "P there"]]
    assert "".join(out) == "Hello "
    assert m.stopped and m.emitted == "Hello "


def test_held_text_is_released_when_it_is_not_a_stop():
    m = StopStringMatcher(["STOP"])
    assert m.feed("ST") == ""
    assert m.feed("ART") == "START"
    assert m.feed("S") == ""
    assert m.flush() == "S"
    assert not m.stopped


def test_earliest_stop_wins():
    m = StopStringMatcher(["b c", "a"])
    assert m.feed("xx b c a") == "xx "
