"""Metrics: the unbiased pass@k against hand computations and brute force over subsets; maj@k; standard errors."""

import itertools
import math

import pytest

from tropd_cli.evaluation.metrics import majority_correct, mean_and_stderr, pass_at_k, pass_ks, summarise


def test_pass_at_k_by_hand():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=4, c=1, k=1 is the plain mean 1/4; k=n is 1 whenever one sample is correct
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 3) == 0.0
    # n-c < k: every k-subset holds a correct sample
    assert pass_at_k(4, 3, 2) == 1.0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_pass_at_k_is_the_average_over_subsets(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_reported_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(8) == [1, 2, 4, 8]


def test_majority_vote():
    assert majority_correct(["3", "4", "3", None], [True, False, True, False])
    assert not majority_correct(["4", "4", "3", "3", "4"], [False, False, True, True, False])
    assert majority_correct(["3", "4"], [True, False])           # a tie goes to the first answer seen
    assert not majority_correct([None, None], [False, False])
    assert majority_correct([None, None, "5"], [False, False, True])  # empty answers do not vote


def test_mean_and_stderr():
    assert mean_and_stderr([1.0]) == (1.0, None)
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5
    assert stderr == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_summarise_sampled_and_greedy():
    correct = [[True, False, False, True], [False, False, False, False], [True, True, True, False]]
    extracted = [["1", "2", "2", "1"], [None, "5", "6", "7"], ["3", "3", "3", "4"]]
    metrics = summarise(correct, extracted, greedy=False)
    assert metrics["avg@4"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])
    assert metrics["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + 0 + pass_at_k(4, 3, 2)) / 3)
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert metrics["maj@4"] == pytest.approx(2 / 3)
    assert {"avg@4_stderr", "pass@2_stderr", "maj@4_stderr"} <= set(metrics)
    greedy = summarise([[True], [False]], [["1"], ["2"]], greedy=True)
    assert greedy == {"greedy": 0.5, "greedy_stderr": pytest.approx(0.5)}
