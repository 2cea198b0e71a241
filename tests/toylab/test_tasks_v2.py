"""Toy lab v2: line forms, the slip channel, and the scratchpad profile that measures both."""

import math
import random
from collections import Counter

import pytest

from tropd_cli.toylab.tasks import (
    LINE_FORMS,
    SLIP_TOKEN,
    V2_DIFFICULTY,
    ScratchpadProfile,
    Verdict,
    grade,
    random_problem,
    solve,
    varied_scratchpad,
)


def text(pieces):
    return "".join(piece for piece, _ in pieces)


def test_canonical_scratchpad_is_the_v1_solution():
    problem = solve(37, [("+", 8), ("-", 5), ("+", 9)])
    assert text(varied_scratchpad(problem, random.Random(0), varied_forms=False)) == problem.solution


def test_every_varied_form_is_arithmetically_true_and_ends_in_the_answer():
    rng = random.Random(1)
    seen = Counter()
    for _ in range(300):
        problem = random_problem(rng, V2_DIFFICULTY)
        response = text(varied_scratchpad(problem, rng, varied_forms=True))
        assert grade(response, problem.answer) is Verdict.CORRECT
        for line in response.split("\n")[:-1]:
            left, right = line.split("=")
            assert eval(left) == eval(right)  # noqa: S307 - our own digits and +/- only
        profile = ScratchpadProfile()
        profile.add(response, problem.expression)
        assert profile.lines == len(response.split("\n")) - 1 == sum(profile.forms)
        seen.update({i: n for i, n in enumerate(profile.forms)})
    total = sum(seen.values())
    for form in range(3):  # drawn uniformly: each form near a third of all lines
        assert abs(seen[form] / total - 1 / 3) < 0.03


def test_profile_names_each_form():
    problem = solve(40, [("+", 5), ("-", 3), ("+", 2), ("-", 4)])
    response = "40+5=45\n45-3=42\n2+42=44\n-4+44=40\n40=44-4\nanswer:40"
    profile = ScratchpadProfile()
    profile.add(response, problem.expression)
    assert profile.forms == [2, 2, 1] and profile.slips == 0
    assert profile.format_coverage == pytest.approx(math.exp(-2 * 0.4 * math.log(0.4) - 0.2 * math.log(0.2)) / 3)


def test_slips_are_the_slip_token_then_a_wrong_value_carried_forward():
    rng = random.Random(2)
    lines = slips = 0
    for _ in range(400):
        problem = random_problem(rng, V2_DIFFICULTY)
        pieces = varied_scratchpad(problem, rng, varied_forms=False, slip_rate=0.1)
        assert all(supervised for _, supervised in pieces)  # the student learns its slips
        response = text(pieces)
        profile = ScratchpadProfile()
        profile.add(response, problem.expression)
        lines += profile.lines
        slips += profile.slips
        assert profile.forms[1:] == [0, 0]
        value = int(problem.expression.split("+")[0].split("-")[0])
        for line in response.split("\n")[:-1]:
            left, right = line.split("=")
            a, op, b = int(left[:len(str(value))]), left[len(str(value))], int(left[len(str(value)) + 1:])
            assert a == value  # every line continues from the value written before
            true = a + b if op == "+" else a - b
            if right.startswith(SLIP_TOKEN):
                assert 1 <= abs(int(right[1:]) - true) <= 3
                value = int(right[1:])
            else:
                assert int(right) == true and SLIP_TOKEN not in right
                value = true
        verdict = grade(response, problem.answer)
        if profile.slips < 2:  # two or more slips may cancel out
            assert verdict is (Verdict.WRONG if profile.slips else Verdict.CORRECT)
    assert abs(slips / lines - 0.1) < 0.02


def test_teacher_text_never_holds_the_slip_token():
    rng = random.Random(3)
    for _ in range(200):
        problem = random_problem(rng, V2_DIFFICULTY)
        assert SLIP_TOKEN not in text(varied_scratchpad(problem, rng, varied_forms=True, error_rate=0.2))


def test_teacher_mistakes_are_unsupervised_and_later_lines_continue_from_them():
    rng = random.Random(4)
    unsupervised = 0
    for _ in range(200):
        problem = random_problem(rng, V2_DIFFICULTY)
        pieces = varied_scratchpad(problem, rng, varied_forms=True, error_rate=0.5)
        unsupervised += sum(not supervised for _, supervised in pieces)
        assert all(piece.isdigit() for piece, supervised in pieces if not supervised)
        lines, line = [], []
        for piece in pieces:
            if piece[0] == "\n":
                lines.append(line)
                line = []
            else:
                line.append(piece)
        for line in lines:
            left, right = text(line).split("=")
            if all(supervised for _, supervised in line):  # a line without an injected mistake is true
                assert eval(left) == eval(right)  # noqa: S307
        profile = ScratchpadProfile()
        profile.add(text(pieces), problem.expression)  # each line starts from the value written before it
        assert sum(profile.forms) == profile.lines == len(lines)
    assert unsupervised > 50


def test_forms_start_with_different_tokens():
    for op, forms in LINE_FORMS.items():
        starts = {form.format(a=30, b=4, c=34 if op == "+" else 26)[:2] for form in forms}
        assert len(starts) == 3
