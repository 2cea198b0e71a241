"""The benchmark registry and problem loading: every entry valid, local copies, shuffled options, bad files."""

import json
from pathlib import Path

import pytest

from tropd_cli.errors import TropdError
from tropd_cli.evaluation.registry import get_benchmark, load_problems, load_registry
from tropd_cli.toylab.tasks import Difficulty, sample_problems

FIXTURES = Path(__file__).parent / "fixtures"
ISSUE_BENCHMARKS = {"gsm8k", "math500", "aime24", "aime25", "amc23", "gpqa-diamond", "toylab", "custom"}


def test_every_entry_loads_against_the_schema():
    registry = load_registry()
    assert ISSUE_BENCHMARKS <= set(registry)
    for name, benchmark in registry.items():
        assert benchmark.name == name
        assert "{prompt}" in benchmark.instruction
        benchmark.instruction.format(prompt="x")  # no stray braces
        if benchmark.source == "hub":
            assert benchmark.hub is not None and benchmark.hub.dataset and benchmark.hub.split
    assert get_benchmark("gsm8k").hub.config == "main"
    assert get_benchmark("gpqa-diamond").fields.incorrect == [f"Incorrect Answer {i}" for i in (1, 2, 3)]


def test_a_benchmark_names_a_known_source_and_grader():
    from pydantic import ValidationError

    from tropd_cli.evaluation.registry import Benchmark

    toylab = get_benchmark("toylab").model_dump()
    assert (toylab["source"], toylab["grader"]) == ("toylab", "toylab")  # a prompt generator's, by its name
    for key in ("source", "grader"):
        with pytest.raises(ValidationError, match=f"{key} should be .* or a prompt generator, not 'nope'"):
            Benchmark(**{**toylab, key: "nope"})


def test_the_names_only_list_is_the_registrys():
    from tropd_cli.evaluation import benchmark_names

    assert benchmark_names() == tuple(load_registry())


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(TropdError, match="unknown benchmark 'gsm9k'; known benchmarks: gsm8k, math500"):
        get_benchmark("gsm9k")


def test_toylab_problems_are_the_manifest_held_out_set():
    problem_set = load_problems(get_benchmark("toylab"), None, seed=1234, limit=20)
    expected = sample_problems(1234, 20, Difficulty(), held_out=True)
    assert [p.message for p in problem_set.problems] == [p.prompt for p in expected]
    assert [p.answer for p in problem_set.problems] == [str(p.answer) for p in expected]
    assert len(load_problems(get_benchmark("toylab"), None, seed=1234, limit=None).problems) == 500


def test_gsm8k_local_copy_and_limit():
    problem_set = load_problems(get_benchmark("gsm8k"), FIXTURES / "gsm8k.jsonl", seed=0, limit=None)
    assert [p.answer for p in problem_set.problems] == ["72", "10", "1434"]
    assert problem_set.problems[0].message.endswith("end with a final line '#### <number>'.")
    assert "gsm8k.jsonl" in problem_set.source
    assert len(load_problems(get_benchmark("gsm8k"), FIXTURES / "gsm8k.jsonl", 0, limit=2).problems) == 2


def test_math_instruction_asks_for_a_box():
    problem = load_problems(get_benchmark("math500"), FIXTURES / "math500.jsonl", 0, None).problems[0]
    assert problem.message.endswith(r"put your final answer within \boxed{}.")
    assert problem.answer == r"\frac{14}{3}" and problem.grader == "math"


def test_gpqa_options_are_shuffled_with_the_seed_and_the_gold_letter_follows():
    benchmark = get_benchmark("gpqa-diamond")
    first = load_problems(benchmark, FIXTURES / "gpqa-diamond.jsonl", seed=0, limit=None)
    again = load_problems(benchmark, FIXTURES / "gpqa-diamond.jsonl", seed=0, limit=None)
    other = load_problems(benchmark, FIXTURES / "gpqa-diamond.jsonl", seed=1, limit=None)
    assert first.fingerprint == again.fingerprint != other.fingerprint
    for problem in first.problems + other.problems:
        assert problem.grader == "choice" and len(problem.choices) == 4
        gold_text = problem.choices["ABCD".index(problem.answer)]
        assert gold_text in ("Photon", "Na", "Mitochondrion")
        assert f"{problem.answer}) {gold_text}" in problem.message
    assert len({p.answer for p in first.problems + other.problems}) > 1  # the gold is not always A


def test_custom_file_with_and_without_choices():
    problems = load_problems(get_benchmark("custom"), FIXTURES / "custom.jsonl", 0, None).problems
    assert [p.grader for p in problems] == ["math", "math", "choice", "choice"]
    assert [p.answer for p in problems] == ["7", r"\frac{1}{2}", "B", "B"]
    assert problems[2].choices == ("3", "4", "5")  # custom options keep their order
    assert "A) 3\nB) 4\nC) 5" in problems[2].message


def test_custom_needs_data():
    with pytest.raises(TropdError, match="pass --data PATH"):
        load_problems(get_benchmark("custom"), None, 0, None)


@pytest.mark.parametrize(("name", "message"), [
    ("custom-malformed.jsonl", "custom-malformed.jsonl:2: not valid JSON"),
    ("custom-missing-answer.jsonl", "custom-missing-answer.jsonl:3: missing field 'answer'"),
    ("nope.jsonl", "does not exist"),
])
def test_malformed_custom_files_are_located(name, message):
    with pytest.raises(TropdError, match=message):
        load_problems(get_benchmark("custom"), FIXTURES / name, 0, None)


def test_bad_choices(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "answer": "Z", "choices": ["1", "2"]}\n')
    with pytest.raises(TropdError, match=r"bad.jsonl:1: answer 'Z' is neither one of the choices nor a letter A-B"):
        load_problems(get_benchmark("custom"), path, 0, None)
    path.write_text('{"prompt": "p", "answer": "1", "choices": "1,2"}\n')
    with pytest.raises(TropdError, match="bad.jsonl:1: field 'choices' must be a list of at least two strings"):
        load_problems(get_benchmark("custom"), path, 0, None)


def test_custom_conversation_rows_ask_their_last_user_turn(tmp_path):
    """Rows of a prepared folder made from conversations carry `messages`, not `prompt`."""
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "compute 2+3"},
                                             {"role": "assistant", "content": "5"},
                                             {"role": "user", "content": "compute 4+4"}], "answer": "8"}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."}], "answer": "1"}) + "\n")
    with pytest.raises(TropdError, match=r"eval.jsonl:2: missing field 'prompt'$"):
        load_problems(get_benchmark("custom"), path, seed=0, limit=None)
    problem = load_problems(get_benchmark("custom"), path, seed=0, limit=1).problems[0]
    assert (problem.question, problem.answer) == ("compute 4+4", "8")
