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
import math
import random
import re
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------------------
# Toy lab v2: several equally valid line forms (a teacher with real entropy) and a student slip channel.
#
# Each scratchpad line may be written in one of three forms; the teacher is trained on all three, drawn
# uniformly, so its next-token distribution at a line start carries real entropy (the forms begin with
# different tokens; the shipped teacher's median at the students' line starts is 1.85 nats). The
# student is trained on the canonical form only, and with probability epsilon per
# line it slips: it writes SLIP_TOKEN, a token no teacher training text contains, then a wrong result that
# later lines carry forward. Slips are rare, very implausible to the teacher, and make the answer wrong:
# the outliers on-policy distillation has to cope with.

SLIP_TOKEN = "?"
CANONICAL_FORM = 0
LINE_FORMS: dict[str, tuple[str, ...]] = {
    "+": ("{a}+{b}={c}", "{b}+{a}={c}", "{c}={a}+{b}"),
    "-": ("{a}-{b}={c}", "{c}={a}-{b}", "-{b}+{a}={c}"),
}
V2_DIFFICULTY = Difficulty(min_terms=4, max_terms=8, max_operand=9, max_value=59)

# Toy lab v3: teacher and student share their line forms, two for "+" lines and one for "-" lines, drawn
# uniformly: the teacher's entropy at a "+" line start (about log 2) is one the student has too, so the trust
# test sees style only where the two disagree about it. Chains of 4-6 terms, which the teacher masters.
V3_LINE_FORMS: dict[str, tuple[str, ...]] = {
    "+": ("step {a}+{b}={c}", "compute {a}+{b}={c}"),
    "-": LINE_FORMS["-"][:1],
}
V3_DIFFICULTY = Difficulty(min_terms=4, max_terms=6, max_operand=9, max_value=59)
FORM_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "varied": LINE_FORMS,
    "canonical": {op: forms[:1] for op, forms in LINE_FORMS.items()},
    "shared": V3_LINE_FORMS,
}


def _line_pieces(form: str, a: tuple[str, bool], b: tuple[str, bool], c: tuple[str, bool]) -> list[tuple[str, bool]]:
    """A line template cut into (text, supervised) pieces: the symbols are supervised, each number as given."""
    pieces: list[tuple[str, bool]] = []
    for part in re.split(r"(\{[abc]\})", form):
        if part in ("{a}", "{b}", "{c}"):
            pieces.append({"{a}": a, "{b}": b, "{c}": c}[part])
        elif part:
            pieces.append((part, True))
    return pieces


def _lowest(value: int, later: list[int]) -> int:
    """The smallest running value from `value` on through the signed `later` terms."""
    lowest = value
    for term in later:
        value += term
        lowest = min(lowest, value)
    return lowest


def varied_scratchpad(problem: Problem, rng: random.Random, varied_forms: bool, error_rate: float = 0.0,
                      slip_rate: float = 0.0, line_forms: dict[str, tuple[str, ...]] = LINE_FORMS
                      ) -> list[tuple[str, bool]]:
    """A v2 (or v3) scratchpad as (piece, supervised) pairs.

    `varied_forms`: each line in a uniformly drawn form of `line_forms` (LINE_FORMS: the v2 teacher;
    V3_LINE_FORMS: v3's teacher and student), else the canonical one (the v2 students). `error_rate`: as
    `noisy_scratchpad`, unsupervised wrong operand copies or results that later lines continue from (the
    teacher learns the locally right continuation after a mistake).
    `slip_rate`: per line, the canonical line's result is replaced by SLIP_TOKEN and a wrong value (1-3 off,
    never driving a later value below 0), supervised, carried forward (the student's slip channel).
    """
    terms = re.findall(r"[+-]?\d+", problem.expression)
    value = int(terms[0])
    pieces: list[tuple[str, bool]] = []
    for index, term in enumerate(terms[1:], start=2):
        op, operand = term[0], int(term[1:])
        later = [int(t) for t in terms[index:]]
        form = rng.randrange(len(line_forms[op])) if varied_forms else CANONICAL_FORM
        written_operand = operand
        if error_rate and rng.random() < error_rate / 2:
            written_operand = max(1, operand + rng.choice([-2, -1, 1, 2]))
            if _lowest(value + written_operand if op == "+" else value - written_operand, later) < 0:
                written_operand = operand  # keep every written value non-negative
        result = value + written_operand if op == "+" else value - written_operand
        written_result = result
        if error_rate and rng.random() < error_rate / 2:
            written_result = result + rng.choice([-2, -1, 1, 2])
            if _lowest(written_result, later) < 0:
                written_result = result
        c_piece = (str(written_result), written_result == result)
        if slip_rate and rng.random() < slip_rate:
            lowest = _lowest(result, later)  # the off-by-delta value must keep every later value non-negative
            written_result = result + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if lowest + d >= 0])
            form, c_piece = CANONICAL_FORM, (SLIP_TOKEN + str(written_result), True)
        template = line_forms[op][form]
        pieces += _line_pieces(template, (str(value), True), (str(written_operand), written_operand == operand),
                               c_piece)
        pieces.append(("\n", True))
        value = written_result
    pieces += [("answer", True), (":", True), (str(value), True)]
    return pieces


_FORM_PATTERNS = (
    (re.compile(r"^(\d+)([+-])(\d+)=(\d+)$"), "infix"),
    (re.compile(r"^(\d+)=(\d+)([+-])(\d+)$"), "result_first"),
    (re.compile(r"^-(\d+)\+(\d+)=(\d+)$"), "negated"),
)


# v3's "+" forms, told apart by their first word (in V3_LINE_FORMS["+"] order); its "-" lines are v2's infix form 0
_V3_PLUS_WORDS = tuple(form.split()[0] for form in V3_LINE_FORMS["+"])
_V3_PLUS = re.compile(rf"^({'|'.join(_V3_PLUS_WORDS)}) (\d+)\+(\d+)=(\d+)$")


@dataclass
class ScratchpadProfile:
    """How responses wrote their scratchpad lines: slips, and which of the line forms (v2's three; v3's two "+"
    forms, counted apart: its "-" lines have one form and say nothing of style)."""

    lines: int = 0
    slips: int = 0
    forms: list[int] = field(default_factory=lambda: [0, 0, 0])  # lines per LINE_FORMS index; others uncounted
    v3_forms: list[int] = field(default_factory=lambda: [0, 0])  # lines per V3_LINE_FORMS["+"] index

    def add(self, response: str, expression: str) -> None:
        """Profile one response to the problem `expression`."""
        previous = int(re.match(r"\d+", expression).group())
        for line in response.split("\n"):
            if not line or line.startswith("answer"):
                continue
            self.lines += 1
            self.slips += SLIP_TOKEN in line
            line = line.replace(SLIP_TOKEN, "")
            v3 = _V3_PLUS.match(line)
            if v3 is not None:
                self.v3_forms[_V3_PLUS_WORDS.index(v3.group(1))] += 1
                previous = int(v3.group(4))
                continue
            for pattern, kind in _FORM_PATTERNS:
                match = pattern.match(line)
                if match is None:
                    continue
                numbers = [int(g) for g in match.groups() if g.isdigit()]
                if kind == "infix":
                    x, op, y = int(match.group(1)), match.group(2), int(match.group(3))
                    form = 1 if op == "+" and x != previous and y == previous else 0
                    previous = numbers[-1]
                elif kind == "result_first":
                    form, previous = 2, numbers[0]
                else:
                    form, previous = 1, numbers[-1]
                self.forms[form] += 1
                break

    @property
    def slip_rate(self) -> float:
        """Slipped lines over all scratchpad lines."""
        return self.slips / self.lines if self.lines else 0.0

    @property
    def format_coverage(self) -> float:
        """exp(entropy of the line-form distribution) / number of forms: 1/3 when one form is used, 1 when
        all three are used equally (the v2 teacher); for v3's "+" lines 1/2 and 1 over its two forms."""
        forms = self.v3_forms if any(self.v3_forms) else self.forms
        total = sum(forms)
        if not total:
            return 0.0
        entropy = -sum(n / total * math.log(n / total) for n in forms if n)
        return math.exp(entropy) / len(forms)
