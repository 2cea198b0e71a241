"""The HF generate backend: left padding, EOS stopping, seeding, and greedy repeats."""

import pytest

from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams, cut_at_eos
from tropd_cli.toylab.models import new_toy_model

EOS = 1


@pytest.fixture(scope="module")
def backend():
    return HFGenerateBackend(new_toy_model("student", seed=3), pad_token_id=0, eos_token_ids=[EOS])


def test_left_padding_does_not_change_greedy_outputs(backend):
    short, long = [2, 40, 41], [2, 50, 51, 52, 53, 54, 55]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    alone = backend.generate([short], 1, greedy, 0).response_ids[0]
    together = backend.generate([long, short], 1, greedy, 0)
    assert together.response_ids[1] == alone
    assert together.prompt_index == [0, 1]


def test_sampling_is_seeded_and_prompt_major(backend):
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    first = backend.generate([[2, 40], [2, 41]], 3, params, generator_seed=11)
    again = backend.generate([[2, 40], [2, 41]], 3, params, generator_seed=11)
    other = backend.generate([[2, 40], [2, 41]], 3, params, generator_seed=12)
    assert first.response_ids == again.response_ids != other.response_ids
    assert first.prompt_index == [0, 0, 0, 1, 1, 1]
    assert all(len(r) <= 5 for r in first.response_ids)


def test_responses_stop_at_eos_and_report_truncation():
    assert cut_at_eos([5, 6, EOS, 0, 0], [EOS]) == ([5, 6, EOS], True)
    assert cut_at_eos([5, 6, 7], [EOS, 9]) == ([5, 6, 7], False)
    assert cut_at_eos([9, 6], [EOS, 9]) == ([9], True)


def test_generation_stops_at_any_eos_id(backend):
    stop_ids = list(range(1, 700))  # most of the vocabulary: every sequence stops within a few tokens
    stopping = HFGenerateBackend(backend.model, pad_token_id=0, eos_token_ids=stop_ids)
    out = stopping.generate([[2, 40], [2, 41, 42]], 8, SamplingParams(max_new_tokens=30, temperature=1.0), 0)
    assert sum(out.finished) >= 14
    for response, finished in zip(out.response_ids, out.finished):
        stops = [t for t in response if t in stop_ids]
        assert stops == ([response[-1]] if finished else [])
        assert finished or len(response) == 30
    assert len({response[-1] for response in out.response_ids}) > 1
