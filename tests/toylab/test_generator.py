"""The toy lab as a prompt generator: what its SPEC hands the real path is the toy tasks' own draws."""

import random
from itertools import islice

from tropd_cli.config import load_config
from tropd_cli.data import is_generator
from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.data.generators import get_generator
from tropd_cli.toylab.tasks import Difficulty, is_held_out, random_problem, sample_problems

SPEC = get_generator("toylab")


def test_it_is_registered_by_name():
    assert is_generator("toylab") and SPEC.name == "toylab"


def test_held_out_problems_are_the_tasks_split_at_the_runs_or_the_default_difficulty():
    config = load_config("toylab", ["data.toylab.max_terms=6"])
    assert SPEC.held_out(7, 5, config) == sample_problems(7, 5, config.data.toylab, held_out=True)
    assert SPEC.held_out(7, 5, None) == sample_problems(7, 5, Difficulty(), held_out=True)


def test_training_prompts_skip_the_held_out_split_and_resume_mid_stream(toy_tokenizer):
    config = load_config("toylab", ["rollout.prompts_per_step=3", "train.seed=2"])
    rng = random.Random(2)
    draws = [problem for problem in (random_problem(rng, config.data.toylab) for _ in range(100))
             if not is_held_out(problem.expression)]
    batches = list(islice(SPEC.training_prompts(config, toy_tokenizer, 0), 4))
    assert batches == [[chat_prompt_ids(toy_tokenizer, p.prompt) for p in draws[i:i + 3]] for i in range(0, 12, 3)]
    assert list(islice(SPEC.training_prompts(config, toy_tokenizer, 2), 2)) == batches[2:]


def test_prepare_rows_record_every_draw_and_its_split():
    config = load_config("toylab", ["data.toylab_prompts=6", "train.seed=1"])
    rows, source = SPEC.prepare_rows(config, 1)
    assert sum(not row.meta["held_out"] for row in rows) == 6
    assert [row.meta["draw"] for row in rows] == list(range(1, len(rows) + 1))
    assert source["data"] == source["kind"] == "toylab" and source["training_prompts"] == 6


def test_grader_and_probe():
    assert SPEC.grade("3+4=7\nanswer:7", "7") == ("7", True)
    assert SPEC.grade("answer:8", "7") == ("8", False)
    config = load_config("toylab", ["train.seed=5"])
    rng = random.Random(5)
    assert SPEC.probe_prompts(config, 4) == [random_problem(rng, config.data.toylab).prompt for _ in range(4)]
