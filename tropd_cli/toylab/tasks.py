"""Synthetic reasoning tasks with verifiable integer answers: chains of additions and subtractions.

A problem is an expression such as `37+8-5+9`; its solution is a scratchpad of one line per step
followed by a fixed final-answer line:

    37+8=45
    45-5=40
    40+9=49
    answer:49

The generator is seeded and has difficulty knobs (number of terms, operand size, value range), defined
with the rest of the configuration as `data.toylab`. A problem belongs to the held-out split iff a hash
of its expression says so, so held-out problems never appear among training prompts, whatever the seed
or the order of generation.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from enum import Enum

from tropd_cli.config import ToyTaskConfig as Difficulty  # the generator's knobs are plain config (data.toylab)

INSTRUCTION = "compute "
ANSWER_PREFIX = "answer:"
HELD_OUT_PER_MILLE = 100


@dataclass(frozen=True)
class Problem:
    """One task instance: the user prompt, the gold answer and the reference scratchpad."""

    expression: str
    answer: int
    solution: str

    @property
    def prompt(self) -> str:
        return INSTRUCTION + self.expression

    @property
    def id(self) -> str:
        return hashlib.sha256(self.expression.encode()).hexdigest()[:12]


def is_held_out(expression: str) -> bool:
    """True iff the expression belongs to the held-out split (a fixed 10% of all expressions)."""
    digest = hashlib.sha256(expression.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def solve(first: int, steps: list[tuple[str, int]]) -> Problem:
    """Build the problem and its scratchpad from a first term and (operator, operand) steps."""
    lines = []
    value = first
    expression = str(first)
    for op, operand in steps:
        new_value = value + operand if op == "+" else value - operand
        lines.append(f"{value}{op}{operand}={new_value}")
        expression += f"{op}{operand}"
        value = new_value
    lines.append(f"{ANSWER_PREFIX}{value}")
    return Problem(expression=expression, answer=value, solution="\n".join(lines))


def noisy_scratchpad(problem: Problem, rng: random.Random, error_rate: float) -> list[tuple[str, bool]]:
    """The problem's scratchpad with injected mistakes, as (piece, supervised) pairs.

    Each line, with probability `error_rate`, gets a wrong operand copy or a wrong result; the wrong
    piece is not supervised, and later lines continue from the value actually written. A teacher
    trained on such text predicts the locally correct next token after a student's mistake (the right
    sum of the numbers on the line, the answer of the last line), as a real teacher would, instead of
    whatever its perfect training data never showed it.
    """
    terms = re.findall(r"[+-]?\d+", problem.expression)
    value = int(terms[0])
    pieces: list[tuple[str, bool]] = []
    for term in terms[1:]:
        op, operand = term[0], int(term[1:])
        written_operand, operand_ok = operand, True
        if rng.random() < error_rate / 2:
            written_operand = max(1, operand + rng.choice([-2, -1, 1, 2]))
            if op == "-" and written_operand > value:  # keep every written value non-negative
                written_operand = operand
            operand_ok = written_operand == operand
        result = value + written_operand if op == "+" else value - written_operand
        written_result, result_ok = result, True
        if rng.random() < error_rate / 2:
            written_result, result_ok = max(0, result + rng.choice([-2, -1, 1, 2])), False
            result_ok = written_result == result
        pieces += [(str(value), True), (op, True), (str(written_operand), operand_ok), ("=", True),
                   (str(written_result), result_ok), ("\n", True)]
        value = written_result
    pieces += [("answer", True), (":", True), (str(value), True)]
    return pieces


def random_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    """One problem whose every intermediate value stays in [0, max_value]."""
    n_terms = rng.randint(difficulty.min_terms, difficulty.max_terms)
    value = rng.randint(1, difficulty.max_value)
    first = value
    steps: list[tuple[str, int]] = []
    for _ in range(n_terms - 1):
        operand = rng.randint(1, difficulty.max_operand)
        allowed = [op for op, v in (("+", value + operand), ("-", value - operand))
                   if 0 <= v <= difficulty.max_value]
        op = rng.choice(allowed) if allowed else "+"
        if not allowed:
            operand = difficulty.max_value - value
            if operand == 0:
                op, operand = "-", 1
        value = value + operand if op == "+" else value - operand
        steps.append((op, operand))
    return solve(first, steps)


def sample_problems(seed: int, count: int, difficulty: Difficulty, held_out: bool) -> list[Problem]:
    """`count` distinct problems from one split, reproducible from `seed`."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 1000 * count + 10000:
            raise ValueError(f"could not draw {count} distinct problems at difficulty {difficulty}")
        problem = random_problem(rng, difficulty)
        if is_held_out(problem.expression) != held_out or problem.expression in seen:
            continue
        seen.add(problem.expression)
        problems.append(problem)
    return problems


class Verdict(str, Enum):
    """How a response's final answer compares with the gold one."""

    CORRECT = "correct"
    WRONG = "wrong"
    MALFORMED = "malformed"
    MISSING = "missing"


_ANSWER_LINE = re.compile(r"^answer:(.*)$", re.MULTILINE)


def extract_answer(response: str) -> str | None:
    """The text after the last `answer:` line start, stripped; None when there is no such line."""
    matches = _ANSWER_LINE.findall(response)
    return matches[-1].strip() if matches else None


def grade(response: str, answer: int) -> Verdict:
    """Grade a response against the gold integer answer.

    Missing: no line starts with `answer:`. Malformed: the last such line does not hold exactly one
    integer. Otherwise correct or wrong by integer equality.
    """
    extracted = extract_answer(response)
    if extracted is None:
        return Verdict.MISSING
    if not re.fullmatch(r"-?\d+", extracted):
        return Verdict.MALFORMED
    return Verdict.CORRECT if int(extracted) == answer else Verdict.WRONG
