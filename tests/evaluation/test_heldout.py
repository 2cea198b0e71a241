"""The run's held-out evaluation (eval.*): the toylab default is exactly the toy lab's measurement; any
`tropd evaluate` benchmark can stand in for it, a seeded subset, every eval.every steps."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tropd_cli.config import load_config
from tropd_cli.distill import distill
from tropd_cli.errors import TropdError
from tropd_cli.evaluation.heldout import HeldOut, eval_data_path
from tropd_cli.models import load_causal_lm, load_tokenizer
from tropd_cli.toylab.accuracy import toy_accuracy
from tropd_cli.toylab.tasks import sample_problems


def toy_jsonl(path: Path, count: int) -> Path:
    problems = sample_problems(7, count, load_config("toylab").data.toylab, held_out=True)
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": str(p.answer)}) + "\n" for p in problems))
    return path


def test_toylab_default_is_the_toy_labs_own_measurement():
    config = load_config("toylab", ["eval.problems=12"])
    tokenizer = load_tokenizer("toylab:student")
    held_out = HeldOut(config, tokenizer)
    expected = sample_problems(config.eval.seed, 12, config.data.toylab, held_out=True)
    assert held_out.problems == expected and held_out.protocol()["benchmark"] == "toylab"
    student = load_causal_lm("toylab:student", trainable=False)
    assert held_out.accuracy(student) == toy_accuracy(student, tokenizer, expected, max_new_tokens=48,
                                                      seed=config.eval.seed).accuracy


def test_a_benchmark_takes_a_seeded_subset_of_a_local_file(tmp_path):
    data = toy_jsonl(tmp_path / "eval.jsonl", 30)
    config = load_config("toylab", ["eval.benchmark=custom", f"eval.data={data}", "eval.problems=8"])
    first = HeldOut(config, load_tokenizer("toylab:student"))
    again = HeldOut(config, load_tokenizer("toylab:student"))
    assert len(first.problems) == 8 and [p.message for p in first.problems] == [p.message for p in again.problems]
    assert [p.index for p in first.problems] == sorted(p.index for p in first.problems)
    protocol = first.protocol()
    assert protocol["benchmark"] == "custom" and protocol["problems"] == 8 and protocol["fingerprint"]
    assert 0.0 <= first.accuracy(load_causal_lm("toylab:teacher", trainable=False)) <= 1.0


def test_custom_reads_the_prepared_eval_split_by_default():
    config = load_config("toylab", ["data.prompts=prepared/x", "eval.benchmark=custom"])
    assert eval_data_path(config) == Path("prepared/x/eval.jsonl")
    assert eval_data_path(load_config("toylab")) is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.benchmark=mmlu"], "invalid value for eval.benchmark: 'mmlu' (input should be one of: gsm8k, "),
    (["eval.benchmark=custom"], "eval.benchmark=custom reads a local file: set eval.data to a JSONL file, or "
                                "data.prompts to a prepared folder (its eval.jsonl)"),
])
def test_bad_benchmarks_are_one_line(overrides, message):
    with pytest.raises(TropdError) as error:
        load_config("toylab", overrides)
    assert str(error.value).startswith(message)


def test_missing_eval_file_stops_before_training(tmp_path):
    config = load_config("toylab", ["eval.benchmark=custom", f"eval.data={tmp_path / 'none.jsonl'}"])
    with pytest.raises(TropdError, match="none.jsonl, which does not exist"):
        HeldOut(config, load_tokenizer("toylab:student"))


def test_in_run_evaluation_is_logged_and_summarised(tmp_path):
    data = toy_jsonl(tmp_path / "eval.jsonl", 10)
    config = load_config("toylab", ["train.steps=4", "rollout.prompts_per_step=2", "rollout.n=2",
                                    "rollout.max_new_tokens=24", "train.threads=1", "eval.benchmark=custom",
                                    f"eval.data={data}", "eval.problems=6", "eval.every=2", "eval.teacher=false"])
    result = distill(config, "toylab", out=str(tmp_path / "run"), console=Console(file=io.StringIO()))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("eval_accuracy" in line) for line in lines] == [False, True, False, True]
    summary = result.summary
    assert summary["held_out"]["benchmark"] == "custom" and summary["held_out"]["problems"] == 6
    assert summary["eval_accuracy_by_step"] == {"2": lines[1]["eval_accuracy"], "4": lines[3]["eval_accuracy"]}
    assert summary["student_accuracy_after"] == lines[3]["eval_accuracy"]
    assert "teacher_accuracy" not in summary and "student_accuracy_before" in summary


def test_sampled_evaluation_with_greedy_and_the_scratchpad_profile():
    config = load_config("toylab", ["eval.problems=10", "eval.k=3", "eval.temperature=1.0", "eval.greedy=true"])
    tokenizer = load_tokenizer("toylab:student")
    held_out = HeldOut(config, tokenizer)
    student = load_causal_lm("toylab:student", trainable=False)
    measured = held_out.measure(student)
    sampled = toy_accuracy(student, tokenizer, held_out.problems, k=3, temperature=1.0, max_new_tokens=48,
                           seed=config.eval.seed)
    greedy = toy_accuracy(student, tokenizer, held_out.problems, max_new_tokens=48, seed=config.eval.seed)
    assert measured == {"accuracy": sampled.accuracy, "greedy_accuracy": greedy.accuracy,
                        "slip_rate": sampled.slip_rate, "format_coverage": sampled.format_coverage}
    assert sampled.k == 3 and measured["accuracy"] != measured["greedy_accuracy"]
    assert held_out.protocol()["greedy"] is True
    assert "greedy_accuracy" not in HeldOut(load_config("toylab", ["eval.problems=4", "eval.greedy=true"]),
                                            tokenizer).measure(student)  # greedy already: graded once


def test_in_run_evaluation_logs_every_measure(tmp_path):
    config = load_config("toylab", ["train.steps=2", "rollout.prompts_per_step=2", "rollout.n=2",
                                    "rollout.max_new_tokens=24", "train.threads=1", "eval.problems=4",
                                    "eval.every=2", "eval.teacher=false", "eval.k=2", "eval.temperature=1.0",
                                    "eval.greedy=true"])
    result = distill(config, "toylab", out=str(tmp_path / "run"), console=Console(file=io.StringIO()))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    measures = {"accuracy", "greedy_accuracy", "slip_rate", "format_coverage"}
    assert {key for key in last if key.startswith("eval_")} == {f"eval_{m}" for m in measures}
    assert set(result.summary["student_eval_before"]) == measures
    assert result.summary["student_eval_after"] == {m: last[f"eval_{m}"] for m in measures}
    assert result.summary["student_accuracy_after"] == last["eval_accuracy"]
