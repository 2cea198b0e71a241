"""Evaluation metrics over problems with n graded samples each: avg@k, pass@k, maj@k and their standard errors.

Every metric is a per-problem score averaged over problems; its standard error is the sample standard
deviation of the per-problem scores over sqrt(number of problems) (None with fewer than two problems).
"""

from __future__ import annotations

import math
from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k).

    The probability that a random k-subset of the n samples holds at least one correct sample
    (Chen et al. 2021); exact in integer arithmetic.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n itself."""
    ks = [2 ** power for power in range(n.bit_length()) if 2 ** power < n]
    return ks + [n]


def majority_correct(extracted: list[str | None], correct: list[bool]) -> bool:
    """maj@k of one problem: is the most frequent extracted answer correct?

    Responses without an answer do not vote; ties go to the answer seen first. Answers vote by their
    extracted text, so equivalent forms (`0.5`, `\\frac{1}{2}`) vote apart.
    """
    votes = Counter(answer for answer in extracted if answer is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(answer for answer in extracted if answer is not None and votes[answer] == top)
    return correct[extracted.index(winner)]


def mean_and_stderr(scores: list[float]) -> tuple[float, float | None]:
    """The mean of per-problem scores and its standard error across problems."""
    mean = sum(scores) / len(scores)
    if len(scores) < 2:
        return mean, None
    variance = sum((score - mean) ** 2 for score in scores) / (len(scores) - 1)
    return mean, math.sqrt(variance / len(scores))


def summarise(correct: list[list[bool]], extracted: list[list[str | None]], greedy: bool) -> dict[str, float | None]:
    """The metrics of one model on one benchmark from per-problem sample grades.

    Greedy decoding (one sample per problem): `greedy` accuracy. Sampling with n per problem:
    `avg@n`, `pass@k` for k in `pass_ks(n)`, `maj@n`. Each metric `m` comes with `m_stderr`.
    """
    metrics: dict[str, float | None] = {}

    def add(name: str, scores: list[float]) -> None:
        metrics[name], metrics[f"{name}_stderr"] = mean_and_stderr(scores)

    if greedy:
        add("greedy", [float(samples[0]) for samples in correct])
        return metrics
    n = len(correct[0])
    add(f"avg@{n}", [sum(samples) / n for samples in correct])
    for k in pass_ks(n):
        add(f"pass@{k}", [pass_at_k(n, sum(samples), k) for samples in correct])
    add(f"maj@{n}", [float(majority_correct(answers, samples)) for answers, samples in zip(extracted, correct)])
    return metrics
