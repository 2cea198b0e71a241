"""Toy lab v3: teacher and student share two forms of "+" lines (told apart by their first word) and one of "-"
lines; v2's text is unchanged."""

import math
import random
import re
from collections import Counter

import pytest

from tropd_cli.toylab.accuracy import prompt_token_ids
from tropd_cli.toylab.sft import sft_batch
from tropd_cli.toylab.tasks import (
    FORM_SETS,
    LINE_FORMS,
    V3_DIFFICULTY,
    V3_LINE_FORMS,
    ScratchpadProfile,
    Verdict,
    grade,
    random_problem,
    sample_problems,
    varied_scratchpad,
)
from tropd_cli.toylab.tokenizer import build_tokenizer


def text(pieces):
    return "".join(piece for piece, _ in pieces)


def test_v3_forms_are_two_plus_forms_and_one_minus_form():
    assert V3_LINE_FORMS == {"+": ("step {a}+{b}={c}", "compute {a}+{b}={c}"), "-": ("{a}-{b}={c}",)}
    assert FORM_SETS["shared"] is V3_LINE_FORMS and FORM_SETS["varied"] is LINE_FORMS
    assert (V3_DIFFICULTY.min_terms, V3_DIFFICULTY.max_terms) == (4, 6)


def test_every_v3_line_is_true_in_one_of_its_forms_and_plus_forms_are_drawn_evenly():
    rng = random.Random(0)
    forms = Counter()
    for _ in range(400):
        problem = random_problem(rng, V3_DIFFICULTY)
        response = text(varied_scratchpad(problem, rng, True, line_forms=V3_LINE_FORMS))
        assert grade(response, problem.answer) is Verdict.CORRECT
        terms = re.findall(r"[+-]\d+", problem.expression)
        value = int(re.match(r"\d+", problem.expression).group())
        lines = response.split("\n")
        assert len(lines) == len(terms) + 1 and 4 <= len(terms) + 1 <= 6
        for line, term in zip(lines, terms):
            op, operand = term[0], int(term[1:])
            result = value + operand if op == "+" else value - operand
            if op == "-":
                assert line == f"{value}-{operand}={result}"
                forms["-"] += 1
            elif line == f"step {value}+{operand}={result}":
                forms["step"] += 1
            else:
                assert line == f"compute {value}+{operand}={result}"
                forms["compute"] += 1
            value = result
    plus = forms["step"] + forms["compute"]
    assert forms["-"] > 0 and abs(forms["step"] / plus - 0.5) < 0.03


def test_teacher_and_student_texts_share_forms_and_differ_only_in_unsupervised_mistakes():
    tokenizer = build_tokenizer()
    problems = sample_problems(5, 32, V3_DIFFICULTY, held_out=False)
    student = sft_batch(tokenizer, problems, rng=random.Random(1), forms="shared")
    again = sft_batch(tokenizer, problems, rng=random.Random(1), forms="shared")
    assert all(torch_equal(student[key], again[key]) for key in student)
    for row, problem in enumerate(problems):  # without mistakes every response token is supervised
        prompt = len(prompt_token_ids(tokenizer, problem))
        assert int((student["labels"][row] != -100).sum()) == int(student["attention_mask"][row].sum()) - prompt
    teacher = sft_batch(tokenizer, problems, 0.2, random.Random(1), forms="shared")
    assert (teacher["labels"] == -100).sum() > (student["labels"] == -100).sum()  # its mistakes carry no label


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_v2_text_is_what_it_was():
    """The v2 forms and draws did not move: the default line forms are LINE_FORMS, canonical is form 0."""
    for varied in (True, False):
        for seed in range(20):
            problem = random_problem(random.Random(seed), V3_DIFFICULTY)
            default = varied_scratchpad(problem, random.Random(seed), varied, 0.2, 0.1)
            explicit = varied_scratchpad(problem, random.Random(seed), varied, 0.2, 0.1,
                                         FORM_SETS["varied" if varied else "canonical"])
            assert default == explicit
    assert {op: forms[0] for op, forms in FORM_SETS["canonical"].items()} == {"+": "{a}+{b}={c}", "-": "{a}-{b}={c}"}


def test_the_profile_counts_v3_forms_and_its_coverage_is_over_two():
    """v3's "+" lines are told apart by their first word; its "-" lines (one form) say nothing of style: one "+"
    form is a coverage of 1/2, both drawn evenly near 1."""
    response = "step 40+5=45\n45-3=42\ncompute 42+2=44\nstep 44+4=48\nanswer: 48"
    profile = ScratchpadProfile()
    profile.add(response, "40+5-3+2+4")
    assert profile.v3_forms == [2, 1] and profile.lines == 4 and profile.forms == [1, 0, 0]
    assert profile.format_coverage == pytest.approx(math.exp(-2 / 3 * math.log(2 / 3) - 1 / 3 * math.log(1 / 3)) / 2)
    one_form = ScratchpadProfile()
    one_form.add("step 40+5=45\n45-3=42\nanswer: 42", "40+5-3")
    assert one_form.format_coverage == 0.5
    rng = random.Random(3)
    even = ScratchpadProfile()
    for _ in range(300):
        problem = random_problem(rng, V3_DIFFICULTY)
        even.add(text(varied_scratchpad(problem, rng, varied_forms=True, line_forms=V3_LINE_FORMS)),
                 problem.expression)
    assert even.lines == sum(even.v3_forms) + sum(even.forms) and even.format_coverage > 0.99
