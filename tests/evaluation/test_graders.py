"""Graders: math-verify equivalences (gold first), gsm8k conventions, option letters, a prompt generator's own
grader (the toy lab's, through the generator registry), threads."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tropd_cli.evaluation import graders
from tropd_cli.evaluation.graders import (
    extract_choice,
    extract_gsm8k,
    grade_all,
    grade_choice,
    grade_gsm8k,
    grade_math,
    grade_response,
)
from tropd_cli.evaluation.registry import EvalProblem, gsm8k_gold


@pytest.mark.parametrize(("response", "gold", "correct"), [
    (r"so the answer is \boxed{0.5}", r"\frac{1}{2}", True),            # boxed decimal vs fraction gold
    (r"\boxed{\frac{1}{2}}", "0.5", True),                             # boxed fraction vs decimal gold
    (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),
    (r"\boxed{0.33}", r"\frac{1}{3}", False),
    (r"The answer is \(1+x^2\).", "x^2+1", True),                     # LaTeX vs plain text gold
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", True),
    (r"\boxed{10.0}", "10", True),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", True),                          # sets in any order
    (r"\boxed{2, 1}", "1,2", True),
    (r"\boxed{1, 3}", "1,2", False),
    (r"\boxed{50\%}", "50", True),                                    # math-verify: 50% matches 50 ...
    (r"\boxed{50\%}", "0.5", True),                                   # ... and 0.5
    (r"\boxed{3} and again \boxed{3}", "3", True),
    (r"\boxed{2} no wait \boxed{3}", "3", False),                     # several different boxes: a set
    ("I do not know.", "3", False),
    ("", "3", False),
])
def test_math_grader(response, gold, correct):
    assert grade_math(response, gold).correct is correct


def test_math_grader_reports_what_it_read():
    assert grade_math("nothing here", "3").extracted is None
    assert grade_math(r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}").extracted == r"\frac{14}{3}"
    assert grade_math(r"\boxed{2} or \boxed{3}", "3").extracted == "2,3"


def test_gsm8k_gold_and_strict_and_flexible_extraction():
    assert gsm8k_gold("48+24 = <<48+24=72>>72 clips.\n#### 72") == "72"
    assert gsm8k_gold("#### 1,434") == "1434"
    response = "She earns 12 per hour, so 50 minutes give $10.\n#### 10\nCheck: 2 + 8 = 10 of 12"
    assert extract_gsm8k(response, "strict") == "10"
    assert extract_gsm8k(response, "flexible") == "12"
    assert extract_gsm8k("The answer is 42.", "strict") is None
    assert extract_gsm8k("The answer is 42.", "flexible") == "42"
    assert extract_gsm8k("no number", "flexible") is None


@pytest.mark.parametrize(("response", "mode", "gold", "correct"), [
    ("#### 1,434", "strict", "1434", True),
    ("so in total $1,434.", "flexible", "1434", True),
    ("The total is 72.00", "flexible", "72", True),
    ("#### -3", "strict", "-3", True),
    ("The answer is 72", "strict", "72", False),
    ("#### 71", "strict", "72", False),
    ("I am not sure", "flexible", "72", False),
])
def test_gsm8k_grader(response, mode, gold, correct):
    assert grade_gsm8k(response, gold, mode).correct is correct


@pytest.mark.parametrize(("response", "letter"), [
    (r"Photons carry it, so \boxed{A}.", "A"),
    (r"\boxed{\text{C}}", "C"),
    (r"\boxed{(B)}", "B"),
    ("The answer is (D).", "D"),
    ("Answer: B", "B"),
    ("**Answer:** C", "C"),
    ("  c) ", None),
    (" C ", "C"),
    ("(B)", "B"),
    ("A is wrong and B is wrong. Answer: D", "D"),
    (r"\boxed{E}", None),                          # only four options
    ("I cannot decide.", None),
])
def test_choice_letter_extraction(response, letter):
    assert extract_choice(response, 4) == letter


def test_choice_grader():
    assert grade_choice("Answer: B", "B", 4).correct
    assert not grade_choice("Answer: C", "B", 4).correct
    assert not grade_choice("no idea", "B", 4).correct


def test_a_generator_name_grades_with_the_generators_own_grader():
    def toy(response: str) -> graders.Grade:
        return grade_response(EvalProblem(0, "compute 3+4", "compute 3+4", "7", "toylab"), response)

    assert toy("3+4=7\nanswer:7") == graders.Grade("7", True)
    assert toy("3+4=8\nanswer:8") == graders.Grade("8", False)
    assert toy("3+4=7") == graders.Grade(None, False)


def math_problem(answer: str) -> EvalProblem:
    return EvalProblem(0, "q", "q", answer, "math")


def test_math_verify_from_a_thread_pool():
    cases = [(r"\boxed{0.5}", r"\frac{1}{2}", True), (r"\boxed{\{1,2\}}", r"\{2,1\}", True),
             (r"\boxed{7}", "8", False), (r"so $x^2+1$", "1+x^2", True)] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        grades = list(pool.map(lambda case: grade_math(case[0], case[1]), cases))
    assert [g.correct for g in grades] == [case[2] for case in cases]
    ordered = grade_all([(math_problem(gold), response) for response, gold, _ in cases], workers=4)
    assert [g.correct for g in ordered] == [case[2] for case in cases]


def test_grade_all_enforces_its_own_timeout(monkeypatch):
    real = graders.grade_response

    def slow_on_hang(problem, response):
        if response == "hang":
            time.sleep(2)
        return real(problem, response)

    monkeypatch.setattr(graders, "grade_response", slow_on_hang)
    started = time.perf_counter()
    grades = grade_all([(math_problem("1"), r"\boxed{1}"), (math_problem("1"), "hang"),
                        (math_problem("2"), r"\boxed{2}")], timeout_s=0.3, workers=2)
    assert time.perf_counter() - started < 1.5
    assert [g.correct for g in grades] == [True, False, True]
    assert [g.timed_out for g in grades] == [False, True, False]


def test_grade_all_reraises_grader_bugs(monkeypatch):
    def broken(problem, response):
        raise RuntimeError("bug")

    monkeypatch.setattr(graders, "grade_response", broken)
    with pytest.raises(RuntimeError, match="bug"):
        grade_all([(math_problem("1"), "1")])
