"""The toy task generator and grader."""

import pytest

from tropd_cli.toylab.tasks import (
    Difficulty,
    Verdict,
    extract_answer,
    grade,
    is_held_out,
    noisy_scratchpad,
    random_problem,
    sample_problems,
    solve,
)


def test_solution_is_a_scratchpad_ending_in_the_answer_line():
    problem = solve(37, [("+", 8), ("-", 5), ("+", 9)])
    assert problem.prompt == "compute 37+8-5+9"
    assert problem.solution == "37+8=45\n45-5=40\n40+9=49\nanswer:49"
    assert problem.answer == 49


def test_generator_is_seeded_and_respects_the_difficulty_knobs():
    difficulty = Difficulty(min_terms=2, max_terms=3, max_operand=4, max_value=20)
    first = sample_problems(3, 50, difficulty, held_out=False)
    assert first == sample_problems(3, 50, difficulty, held_out=False)
    assert first != sample_problems(4, 50, difficulty, held_out=False)
    for problem in first:
        lines = problem.solution.split("\n")
        assert 1 <= len(lines) - 1 <= 2
        for line in lines[:-1]:
            left, result = line.split("=")
            operand = int(left.replace("-", "+").split("+")[1])
            assert 1 <= operand <= 4 and 0 <= int(result) <= 20
        assert grade(problem.solution, problem.answer) is Verdict.CORRECT


def test_held_out_split_never_overlaps_training_prompts():
    difficulty = Difficulty()
    held = {p.expression for p in sample_problems(0, 500, difficulty, held_out=True)}
    train = {p.expression for p in sample_problems(1, 5000, difficulty, held_out=False)}
    assert len(held) == 500 and held.isdisjoint(train)
    assert all(is_held_out(e) for e in held) and not any(is_held_out(e) for e in train)


def test_held_out_fraction_is_about_ten_percent():
    import random

    rng = random.Random(0)
    expressions = {random_problem(rng, Difficulty()).expression for _ in range(20000)}
    fraction = sum(map(is_held_out, expressions)) / len(expressions)
    assert fraction == pytest.approx(0.10, abs=0.01)


@pytest.mark.parametrize(("response", "verdict"), [
    ("3+4=7\nanswer:7", Verdict.CORRECT),
    ("3+4=8\nanswer:8", Verdict.WRONG),
    ("answer:5\n3+4=7\nanswer:7", Verdict.CORRECT),
    ("answer:7\nanswer:6", Verdict.WRONG),
    ("3+4=7\nanswer:seven", Verdict.MALFORMED),
    ("3+4=7\nanswer:7+1", Verdict.MALFORMED),
    ("3+4=7\nanswer:", Verdict.MALFORMED),
    ("3+4=7\nthe answer:7", Verdict.MISSING),
    ("3+4=7", Verdict.MISSING),
    ("", Verdict.MISSING),
])
def test_grader_verdicts(response, verdict):
    assert grade(response, 7) is verdict


def test_extract_answer_takes_the_last_answer_line():
    assert extract_answer("answer:1\nanswer: 12 ") == "12"
    assert extract_answer("no answer here") is None


def test_impossible_draw_is_reported():
    tiny = Difficulty(min_terms=2, max_terms=2, max_operand=1, max_value=2)
    with pytest.raises(ValueError, match="could not draw"):
        sample_problems(0, 1000, tiny, held_out=True)


def test_noisy_scratchpad_without_errors_is_the_solution():
    import random

    problem = solve(37, [("+", 8), ("-", 5), ("+", 9)])
    pieces = noisy_scratchpad(problem, random.Random(0), error_rate=0.0)
    assert "".join(text for text, _ in pieces) == problem.solution
    assert all(supervised for _, supervised in pieces)


def test_noisy_scratchpad_mistakes_are_unsupervised_and_later_lines_stay_consistent():
    import random

    rng = random.Random(1)
    problems = sample_problems(0, 200, Difficulty(), held_out=False)
    unsupervised = 0
    for problem in problems:
        pieces = noisy_scratchpad(problem, rng, error_rate=0.5)
        text = "".join(t for t, _ in pieces)
        lines = text.split("\n")
        carried = None
        for line in lines[:-1]:
            left, result = line.split("=")
            op = "+" if "+" in left else "-"
            a, b = map(int, left.split(op))
            assert carried is None or a == carried  # each line starts from the value written above
            carried = int(result)
        assert lines[-1] == f"answer:{carried}"
        unsupervised += sum(not supervised for _, supervised in pieces)
        for (piece, supervised) in pieces:
            assert supervised or piece.isdigit()
    assert unsupervised > 50
